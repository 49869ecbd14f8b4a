"""Test configuration: 8 simulated CPU devices, set before any computation."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", False)
# No implicit dtype promotion: a mixed-dtype operation in the library or a test
# is an error (as in equinox and optimistix). Where optax itself promotes, the
# test scopes `jax.numpy_dtype_promotion("standard")` around that call.
jax.config.update("jax_numpy_dtype_promotion", "strict")

import os  # noqa: E402

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
  del config
  if os.environ.get("SAM_OPTAX_SLOW") == "1":
    return
  skip = pytest.mark.skip(reason="slow; set SAM_OPTAX_SLOW=1 to run")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
