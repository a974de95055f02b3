from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StepKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STEP_KIND_UNSPECIFIED: _ClassVar[StepKind]
    STEP_KIND_TRAIN: _ClassVar[StepKind]
    STEP_KIND_BACKWARD: _ClassVar[StepKind]
    STEP_KIND_PREDICT: _ClassVar[StepKind]
STEP_KIND_UNSPECIFIED: StepKind
STEP_KIND_TRAIN: StepKind
STEP_KIND_BACKWARD: StepKind
STEP_KIND_PREDICT: StepKind

class Tensor(_message.Message):
    __slots__ = ("data", "shape", "dtype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("stream_id", "step", "activations", "labels", "attention_mask", "kind", "upstream_grad")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_GRAD_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    step: int
    activations: Tensor
    labels: Tensor
    attention_mask: Tensor
    kind: StepKind
    upstream_grad: Tensor
    def __init__(self, stream_id: _Optional[str] = ..., step: _Optional[int] = ..., activations: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Union[Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., kind: _Optional[_Union[StepKind, str]] = ..., upstream_grad: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class StepReply(_message.Message):
    __slots__ = ("step", "grad", "loss", "predictions", "trunk_output", "trunk_steps")
    STEP_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    TRUNK_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    TRUNK_STEPS_FIELD_NUMBER: _ClassVar[int]
    step: int
    grad: Tensor
    loss: float
    predictions: Tensor
    trunk_output: Tensor
    trunk_steps: int
    def __init__(self, step: _Optional[int] = ..., grad: _Optional[_Union[Tensor, _Mapping]] = ..., loss: _Optional[float] = ..., predictions: _Optional[_Union[Tensor, _Mapping]] = ..., trunk_output: _Optional[_Union[Tensor, _Mapping]] = ..., trunk_steps: _Optional[int] = ...) -> None: ...
