"""The paper's mathematics as pure functions of tensors: one module per paper section.

No model, no data, no I/O; only ``torch`` is imported. See ``rlmt_edu.equations.INDEX`` for the map from
equation numbers to functions, tests and notebooks.
"""
