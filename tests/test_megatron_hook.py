"""`megatron_dsv3.pipeline.install`: Megatron-Core's get_forward_backward_func returns the
registered schedule asked for, whatever arguments a release passes, and uninstall undoes it."""
import sys
import types

import pytest

from megatron_dsv3 import registry
from megatron_dsv3.pipeline import Schedule, ScheduleRefused, megatron_hook


@pytest.fixture
def test_schedule():
    calls = []

    def forward_backward(**kwargs):
        calls.append(kwargs)
        return []

    registry.register("schedule", "hook-test", Schedule("hook-test", executor=lambda: forward_backward), overwrite=True)
    yield forward_backward
    megatron_hook.uninstall()
    registry._REGISTRY["schedule"].pop("hook-test", None)


def test_install_rebinds_megatron_core_and_uninstall_restores(test_schedule):
    import megatron.core.pipeline_parallel as pipeline_parallel
    from megatron.core.pipeline_parallel import schedules

    originals = (pipeline_parallel.get_forward_backward_func, schedules.get_forward_backward_func)
    megatron_hook.install("hook-test")
    assert megatron_hook.installed() == "hook-test"
    # 0.16 passes (pp_size, vp_size); later releases pass keywords: each gets the schedule asked for
    assert pipeline_parallel.get_forward_backward_func() is test_schedule
    assert schedules.get_forward_backward_func(2, None) is test_schedule
    assert schedules.get_forward_backward_func(pp_size=2, vp_size=2) is test_schedule
    megatron_hook.uninstall()
    assert megatron_hook.installed() is None
    assert (pipeline_parallel.get_forward_backward_func, schedules.get_forward_backward_func) == originals


def test_install_reaches_the_name_megatron_training_imported(test_schedule, monkeypatch):
    training = types.ModuleType("megatron.training.training")

    def megatron_choice(*args, **kwargs):
        return "megatron's own"

    training.get_forward_backward_func = megatron_choice
    monkeypatch.setitem(sys.modules, "megatron.training.training", training)
    megatron_hook.install("hook-test")
    assert training.get_forward_backward_func() is test_schedule
    megatron_hook.install("1f1b")  # back to Megatron-Core's own choice
    assert training.get_forward_backward_func is megatron_choice
    assert megatron_hook.installed() is None


def test_install_refuses_an_unregistered_name():
    with pytest.raises(KeyError, match=r"'zb-v' is not registered; registered: .*1f1b.*dualpipev"):
        megatron_hook.install("zb-v")
    assert megatron_hook.installed() is None


def test_install_refuses_a_simulated_only_schedule_by_name():
    with pytest.raises(ScheduleRefused, match=r"parallel\.schedule='zb1p' is simulated only"):
        megatron_hook.install("zb1p")
    assert megatron_hook.installed() is None
