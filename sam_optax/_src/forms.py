"""The two public forms of a method: around a base optimizer, and a chain block.

A method module writes one private ``build(name, *, options, **hyper)`` that
returns the sharpness-aware block, and one public wrapper with the explicit
signature and the full docstring. :func:`around` is the wrapper's body;
:func:`chain_block` derives the block form from the wrapper: the same
signature without ``base_optimizer`` (so ``optax.inject_hyperparams`` binds it
exactly as it binds the wrapper), the same defaults, a short docstring that
points to the wrapper.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping

import optax

from sam_optax._src import core

Build = Callable[..., optax.GradientTransformationExtraArgs]


def _split(arguments: Mapping[str, Any]):
  """``(hyper-parameters, core.Options)`` from a call's bound arguments."""
  hyper = {k: v for k, v in arguments.items() if k not in core.Options._fields}
  options = core.Options(**{k: v for k, v in arguments.items()
                            if k in core.Options._fields})
  return hyper, options


def around(build: Build, name: str, arguments: Mapping[str, Any]):
  """The wrapper's body: ``build``'s block, then ``base_optimizer``.

  ``arguments`` are the wrapper's own (``locals()`` at its first line).
  """
  hyper, options = _split(arguments)
  base_optimizer = hyper.pop("base_optimizer")
  return core.with_base(build(name, options=options, **hyper), base_optimizer)


def chain_block(wrapper: Callable[..., Any], build: Build, *, name: str,
                summary: str) -> Callable[..., Any]:
  """The chain-block form of ``wrapper``, named ``name``."""
  signature = inspect.signature(wrapper)
  signature = signature.replace(parameters=[
      p for p in signature.parameters.values() if p.name != "base_optimizer"])
  public = f"sam_optax.{name}"

  @functools.wraps(wrapper, assigned=("__module__",), updated=())
  def block(*args, **kwargs):
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    hyper, options = _split(bound.arguments)
    return build(public, options=options, **hyper)

  block.__name__ = block.__qualname__ = name
  block.__signature__ = signature
  block.__doc__ = (f"{summary}\n\n  Equal to :func:`{wrapper.__name__}` without "
                   "``base_optimizer``; see it for the maths.\n  ")
  return block
