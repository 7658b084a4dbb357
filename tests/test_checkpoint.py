"""Checkpoints restore on a machine other than the one that wrote them.

A GPU run's checkpoint read on the CPU (packing a toy-world carry on the lent machine with JAX_PLATFORMS=cpu) failed
orbax's topology check, since the saved device does not exist there. Here a subprocess with four fake CPU devices
writes arrays that live on its last device, and this process, which has one device, reads them back.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jinbetween.checkpoint import TrainingCheckpoints, restore_tree

WRITER = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp
    from jinbetween.checkpoint import TrainingCheckpoints, save_tree
    last = jax.devices()[-1]
    tree = {"w": jax.device_put(jnp.arange(6.0).reshape(2, 3), last), "step": jax.device_put(jnp.int32(7), last)}
    save_tree(sys.argv[1] + "/tree", tree)
    with TrainingCheckpoints(sys.argv[1] + "/run") as checkpoints:
        checkpoints.save(3, tree, {"note": "written on " + str(last)})
""")


@pytest.fixture(scope="module")
def written_elsewhere(tmp_path_factory):
    folder = tmp_path_factory.mktemp("elsewhere")
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} "
                                      "--xla_force_host_platform_device_count=4".strip(), "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", WRITER, str(folder)], env=env, check=True, capture_output=True, timeout=300)
    return folder


def _abstract():
    return jax.eval_shape(lambda: {"w": jnp.zeros((2, 3)), "step": jnp.int32(0)})


def test_a_run_checkpoint_from_other_devices_restores_here(written_elsewhere):
    assert len(jax.devices()) < 4
    with TrainingCheckpoints(written_elsewhere / "run") as checkpoints:
        tree, record = checkpoints.restore(3, _abstract())
    np.testing.assert_array_equal(np.asarray(tree["w"]), np.arange(6.0).reshape(2, 3))
    assert int(tree["step"]) == 7 and record["note"] == "written on cpu:3"
    assert tree["w"].sharding.device_set == {jax.devices()[0]}


def test_a_tree_from_other_devices_restores_here(written_elsewhere):
    tree = restore_tree(written_elsewhere / "tree", _abstract())
    np.testing.assert_array_equal(np.asarray(tree["w"]), np.arange(6.0).reshape(2, 3))


def test_control_orbax_alone_refuses_that_checkpoint(written_elsewhere):
    # The failure the placement avoids: the same abstract tree handed to orbax as it is.
    checkpointer = ocp.StandardCheckpointer()
    try:
        with pytest.raises(ValueError, match="[Tt]opology"):
            checkpointer.restore((written_elsewhere / "tree").absolute(), _abstract())
    finally:
        checkpointer.close()
