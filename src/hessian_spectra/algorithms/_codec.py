"""Round trips for result dataclasses: ``to_dict``/``from_dict`` and ``save``/``load``.

Three formats, chosen by the file suffix:

- ``.json``: plain numbers (tensors become nested lists, their dtypes are kept
  beside them under ``"dtypes"``; non-finite floats are the strings ``"nan"``,
  ``"inf"``, ``"-inf"``);
- ``.pt``: a plain dict of numbers, strings, lists and tensors written with
  :func:`torch.save`, which ``torch.load(path, weights_only=True)`` reads (no
  pickled classes);
- ``.safetensors`` (needs the ``safetensors`` package): the tensors, with the
  other fields as JSON in the file's metadata.

The decoder is driven by the dataclass' type hints, so a field typed ``Tensor``
comes back as a tensor, ``float`` as a float (also from ``"nan"``), ``tuple[...]``
as a tuple and a nested result type through its own ``from_dict``.
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar, Union

import torch
from torch import Tensor

__all__ = ["FORMAT", "Serializable", "load_result"]

FORMAT = "hessian_spectra"
"""Marker stored in every ``.pt``/``.safetensors`` file written here."""

_REGISTRY: dict[str, type[Serializable]] = {}
_S = TypeVar("_S", bound="Serializable")


def to_jsonable(x: Any) -> Any:
    """JSON-ready values of tensors (as lists), dataclasses and containers; dtypes, devices
    and non-finite floats as strings."""
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, (bool, int, str)) or x is None:
        return x
    if isinstance(x, torch.dtype | torch.device):
        return str(x)
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [to_jsonable(v) for v in x]
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        return to_jsonable((x.double() if x.is_floating_point() else x).tolist())
    if hasattr(x, "__dataclass_fields__"):
        return {f.name: to_jsonable(getattr(x, f.name)) for f in fields(x)}
    if hasattr(x, "item"):
        return to_jsonable(x.item())
    return str(x)


def _encode(x: Any, include_vectors: bool, keep_tensors: bool) -> Any:
    if isinstance(x, Serializable):
        return x._tree(include_vectors=include_vectors, keep_tensors=keep_tensors)
    if isinstance(x, Tensor):
        return x.detach().cpu().clone() if keep_tensors else to_jsonable(x)
    if isinstance(x, dict):
        return {str(k): _encode(v, include_vectors, keep_tensors) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_encode(v, include_vectors, keep_tensors) for v in x]
    if keep_tensors and isinstance(x, float):
        return x
    return to_jsonable(x)


def _dtype_of(x: Any) -> torch.dtype | None:
    if isinstance(x, Tensor):
        return x.dtype
    if isinstance(x, list | tuple) and x and isinstance(x[0], Tensor):
        return x[0].dtype
    return None


def _unstr(x: Any) -> Any:
    """Undo ``to_jsonable`` on numbers: ``"nan"``/``"inf"``/``"-inf"`` back to floats."""
    if isinstance(x, str) and x in ("nan", "inf", "-inf"):
        return float(x)
    if isinstance(x, list):
        return [_unstr(v) for v in x]
    return x


def _tensor(v: Any, dtype: str | None) -> Tensor:
    dt = getattr(torch, dtype) if dtype else None
    if isinstance(v, Tensor):
        return v if dt is None else v.to(dt)
    v = _unstr(v)
    t = torch.tensor(v)
    if t.is_floating_point():  # parse floats in float64: a float32 parse would round them
        t = torch.tensor(v, dtype=torch.float64)
    return t if dt is None else t.to(dt)


def _decode(hint: Any, v: Any, dtype: str | None) -> Any:
    if v is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        for a in options[:-1]:
            try:
                return _decode(a, v, dtype)
            except (TypeError, ValueError, RuntimeError):
                continue
        return _decode(options[-1], v, dtype)
    if hint is Tensor:
        return _tensor(v, dtype)
    if hint is float:
        return float(v)
    if hint in (int, bool, str):
        return hint(v)
    if origin in (list, tuple):
        inner = args[0] if args else Any
        items = [_decode(inner, x, dtype) for x in v]
        return tuple(items) if origin is tuple else items
    if isinstance(hint, type) and issubclass(hint, Serializable):
        return hint.from_dict(v)
    return v


class Serializable:
    """Mixin for frozen result dataclasses: ``to_dict``/``from_dict``, ``save``/``load``.

    ``_vector_fields`` names the large tensor fields that ``to_dict`` and JSON files
    leave out unless ``include_vectors=True`` (``.pt``/``.safetensors`` keep them).
    """

    _vector_fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls

    def _tree(self, *, include_vectors: bool, keep_tensors: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"type": type(self).__name__}
        dtypes: dict[str, str] = {}
        for f in fields(self):  # type: ignore[arg-type]
            if f.name in self._vector_fields and not include_vectors:
                continue
            value = getattr(self, f.name)
            dt = _dtype_of(value)
            if dt is not None:
                dtypes[f.name] = str(dt).removeprefix("torch.")
            out[f.name] = _encode(value, include_vectors, keep_tensors)
        if dtypes:
            out["dtypes"] = dtypes
        return out

    def to_dict(self, *, include_vectors: bool = False) -> dict[str, Any]:
        """Plain Python values that :func:`json.dumps` accepts; :meth:`from_dict` reads them back.

        Args:
            include_vectors: also the large tensor fields (eigenvectors, per-entry
                estimates), as nested lists.
        """
        return self._tree(include_vectors=include_vectors, keep_tensors=False)

    @classmethod
    def _absent(cls, name: str, values: dict[str, Any]) -> Any:
        raise ValueError(
            f"{cls.__name__}.from_dict: field {name!r} is missing; it is written only with "
            "include_vectors=True (or in .pt/.safetensors files)"
        )

    @classmethod
    def from_dict(cls: type[_S], data: dict[str, Any]) -> _S:
        """Rebuild the result from :meth:`to_dict` output (or a loaded file's contents)."""
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
        kind = data.get("type", cls.__name__)
        if kind != cls.__name__:
            raise ValueError(
                f"{cls.__name__}.from_dict: the data holds a {kind!r}; load it with {kind}.from_dict "
                "or hessian_spectra.load_result"
            )
        hints = typing.get_type_hints(cls)
        dtypes = data.get("dtypes", {})
        values: dict[str, Any] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            if f.name in data:
                values[f.name] = _decode(hints[f.name], data[f.name], dtypes.get(f.name))
            elif f.name in cls._vector_fields and f.default is f.default_factory:
                # both MISSING: a required field that to_dict() left out
                values[f.name] = cls._absent(f.name, values)
        return cls(**values)

    def save(self, path: str | Path, *, include_vectors: bool = False) -> Path:
        """Write the result: ``.json`` (numbers), ``.pt`` or ``.safetensors`` (tensors too).

        ``.pt`` files hold plain dicts of tensors and numbers, so
        ``torch.load(path, weights_only=True)`` reads them; :meth:`load` rebuilds the
        result from any of the three.

        Args:
            path: the file; its suffix picks the format.
            include_vectors: for ``.json``, also write the large tensor fields
                (``.pt``/``.safetensors`` always hold them).
        """
        path = Path(path)
        if path.suffix == ".json":
            path.write_text(json.dumps(self.to_dict(include_vectors=include_vectors), indent=2))
        elif path.suffix == ".pt":
            tree = self._tree(include_vectors=True, keep_tensors=True)
            torch.save({"format": FORMAT, "version": 1, "data": tree}, path)
        elif path.suffix == ".safetensors":
            _save_safetensors(self._tree(include_vectors=True, keep_tensors=True), path)
        else:
            raise ValueError(
                f"{type(self).__name__}.save writes .json, .pt or .safetensors files, got {path.name!r}"
            )
        return path

    @classmethod
    def load(cls: type[_S], path: str | Path) -> _S:
        """Read a file written by :meth:`save` (``.json``, ``.pt`` or ``.safetensors``)."""
        return cls.from_dict(_read(Path(path)))


def _save_safetensors(tree: dict[str, Any], path: Path) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError as err:
        raise ImportError(
            "writing .safetensors needs the safetensors package (pip install safetensors); "
            "or save to .pt"
        ) from err
    tensors: dict[str, Tensor] = {}

    def strip(x: Any) -> Any:
        if isinstance(x, Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = x.contiguous()
            return {"__tensor__": key}
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items()}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    meta = json.dumps(strip(tree))
    save_file(tensors, str(path), metadata={"format": FORMAT, "data": meta})


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"no result file at {str(path)!r}")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
    elif path.suffix == ".pt":
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise ValueError(
                f"{str(path)!r} is not a result file written by hessian_spectra's save()"
            )
        data = blob["data"]
    elif path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        if meta.get("format") != FORMAT:
            raise ValueError(
                f"{str(path)!r} is not a result file written by hessian_spectra's save()"
            )

        def fill(x: Any) -> Any:
            if isinstance(x, dict):
                if set(x) == {"__tensor__"}:
                    return tensors[x["__tensor__"]]
                return {k: fill(v) for k, v in x.items()}
            if isinstance(x, list):
                return [fill(v) for v in x]
            return x

        data = fill(json.loads(meta["data"]))
    else:
        raise ValueError(f"results load from .json, .pt or .safetensors files, got {path.name!r}")
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} does not hold a result (a dict with a 'type')")
    return data


def load_result(path: str | Path) -> Any:
    """Load any result written by a ``save()`` here, whatever its type.

    Args:
        path: a ``.json``, ``.pt`` or ``.safetensors`` file.

    Returns:
        The result object (``EigenResult``, ``TraceResult``, ``BlockSpectra``, ...),
        chosen by the ``"type"`` stored in the file.
    """
    data = _read(Path(path))
    kind = data.get("type")
    if kind not in _REGISTRY:
        raise ValueError(
            f"{str(path)!r} holds type {kind!r}; known result types are {sorted(_REGISTRY)}"
        )
    return _REGISTRY[kind].from_dict(data)
