"""hessian-eigenthings' module path for the parameter utilities (see :mod:`.params`)."""

from hessian_spectra.params import (
    ParamFilter,
    flatten_params,
    get_filtered_params,
    get_param_list,
    get_param_names,
    get_param_sizes,
    match_names,
    match_regex,
    params_to_vector,
    select_parameters,
    total_size,
    unflatten_params,
    vector_to_params,
)

__all__ = [
    "ParamFilter",
    "flatten_params",
    "get_filtered_params",
    "get_param_list",
    "get_param_names",
    "get_param_sizes",
    "match_names",
    "match_regex",
    "params_to_vector",
    "select_parameters",
    "total_size",
    "unflatten_params",
    "vector_to_params",
]
