"""One registry of pre-training methods.

A method is an nn.Module with
  noise_shape: per-sample shape of the uniform noise the trainer draws on the device each step
               (segment order for D-iGPT, patch order for SAIM, () for none);
  forward(images, targets, noise) -> dict of scalar losses, "loss" being the one to minimise;
  encoder: the backbone that downstream evaluation keeps;
  fsdp_blocks (optional): module classes FSDP wraps one by one (transformer blocks).
The trainer only sees this interface, so a new objective or backbone registers a builder here and
needs no trainer change.
"""
from typing import Callable

_METHODS: dict[str, Callable] = {}


def register_method(name: str):
    def wrap(builder):
        _METHODS[name] = builder
        return builder
    return wrap


def method_names() -> list[str]:
    return sorted(_METHODS)


def create_method(name: str, **kwargs):
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {method_names()}")
    return _METHODS[name](**kwargs)
