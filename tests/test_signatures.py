"""Issue 27's check: no function in labkit/quant or labkit/serve takes more than 8 parameters (`self`
counted). Past that, options travel as one typed object (ServeConfig, QuantScheme) instead."""

import dataclasses
import importlib
import inspect
import pkgutil

import labkit.quant
import labkit.serve

MAX_PARAMS = 8


def functions(package):
    """(qualified name, function) for every function and method defined in the package's modules."""
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj):
                yield f"{module.__name__}.{name}", obj
            elif inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if dataclasses.is_dataclass(obj) and attr == "__init__":
                        continue  # generated from the fields: a record, not a call to design
                    member = getattr(member, "__func__", member)  # classmethod, staticmethod
                    if inspect.isfunction(member) and member.__module__ == module.__name__:
                        yield f"{module.__name__}.{name}.{attr}", member


def test_no_function_takes_more_than_eight_parameters():
    counted = dict(f for package in (labkit.quant, labkit.serve) for f in functions(package))
    assert len(counted) > 200  # (the walk found both packages)
    too_many = {
        name: len(inspect.signature(fn).parameters)
        for name, fn in counted.items()
        if len(inspect.signature(fn).parameters) > MAX_PARAMS
    }
    assert not too_many, f"pass one config object instead: {too_many}"
