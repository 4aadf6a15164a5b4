"""Launch checks: the CPU defaults that make a multi-process launch one gloo group, and the stops when a launch that
asked for several processes would train on one."""

import types

import pytest
from accelerate.utils import DistributedType

from trl_forking.scripts.launch import check_launch, check_world_size, cpu_defaults
from trl_forking.scripts.usage import UsageError

# What `accelerate launch` exports to each process (recipes/accelerate/*.yaml with --num_processes 2).
DDP = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
DEEPSPEED = {**DDP, "ACCELERATE_USE_DEEPSPEED": "true"}
CPU_FLAG = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}  # --cpu: one process


def test_cpu_defaults_make_plain_ddp_a_gloo_group_and_leave_deepspeed_its_accelerator():
    single = {"bf16": False, "dataloader_pin_memory": False}
    assert cpu_defaults({}) == single
    assert cpu_defaults(DDP) == {**single, "ddp_backend": "gloo", "use_cpu": True, "ddp_find_unused_parameters": False}
    # use_cpu would bypass DeepSpeed (transformers checks it first); DeepSpeed's CPU accelerator needs only gloo.
    assert cpu_defaults(DEEPSPEED) == {**single, "ddp_backend": "gloo"}


def test_check_launch_stops_a_cpu_launch_that_asked_for_several_processes_but_started_one():
    with pytest.raises(UsageError, match=r"^launch: accelerate launch --cpu .* drop --cpu"):
        check_launch(CPU_FLAG)
    check_launch({"ACCELERATE_USE_CPU": "True"})  # --cpu with one process: fine
    check_launch(DDP)  # several processes started: fine
    check_launch({})


def _state(num_processes, distributed_type):
    return types.SimpleNamespace(num_processes=num_processes, distributed_type=distributed_type)


def test_check_world_size_stops_processes_that_would_each_train_alone():
    check_world_size(_state(2, DistributedType.MULTI_CPU), DDP)
    check_world_size(_state(2, DistributedType.DEEPSPEED), DEEPSPEED)
    check_world_size(_state(1, DistributedType.NO), {})
    # What ddp.yaml on CPU gave before the defaults above: a group of 2, but accelerate's DistributedType.NO.
    with pytest.raises(UsageError, match=r"launcher started 2 processes but accelerate set up 2 as DistributedType.NO"):
        check_world_size(_state(2, DistributedType.NO), DDP)
    with pytest.raises(UsageError, match=r"launcher started 2 processes but accelerate set up 1"):
        check_world_size(_state(1, DistributedType.NO), DDP)
