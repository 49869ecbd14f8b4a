"""Versions and machine, in one dict and one line (every report ends with it)."""

from __future__ import annotations

import datetime
import os
import platform
from typing import Optional

import jax
import jaxlib
import numpy as np
import optax

import sam_optax


def environment() -> dict[str, str]:
  dev = jax.devices()[0]
  return {
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "optax": optax.__version__,
      "numpy": np.__version__,
      "sam_optax": sam_optax.__version__,
      "python": platform.python_version(),
      "machine": (f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                  f"{platform.system()} {platform.release()}, "
                  f"{jax.device_count()} × device {dev.platform}:{dev.device_kind}"),
      "load average": f"{os.getloadavg()[0]:.1f}",
      "date": datetime.date.today().isoformat(),
  }


def line(elapsed_s: Optional[float] = None) -> str:
  """``Run time N s; jax …; …; machine …; load average …; date …``."""
  env = "; ".join(f"{k} {v}" for k, v in environment().items())
  return (f"Run time {elapsed_s:.0f} s; " if elapsed_s is not None else "") + env
