from fedtune._proto.v1 import privacy_pb2 as _privacy_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NamedArray(_message.Message):
    __slots__ = ("name", "shape", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class AdapterSync(_message.Message):
    __slots__ = ("schema_version", "server_round", "arrays")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_ROUND_FIELD_NUMBER: _ClassVar[int]
    ARRAYS_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    server_round: int
    arrays: _containers.RepeatedCompositeFieldContainer[NamedArray]
    def __init__(self, schema_version: _Optional[int] = ..., server_round: _Optional[int] = ..., arrays: _Optional[_Iterable[_Union[NamedArray, _Mapping]]] = ...) -> None: ...

class AdapterReply(_message.Message):
    __slots__ = ("schema_version", "server_round", "num_examples", "train_loss", "peak_memory_mb", "arrays", "dp")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    ARRAYS_FIELD_NUMBER: _ClassVar[int]
    DP_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    server_round: int
    num_examples: int
    train_loss: float
    peak_memory_mb: float
    arrays: _containers.RepeatedCompositeFieldContainer[NamedArray]
    dp: _privacy_pb2.DPReport
    def __init__(self, schema_version: _Optional[int] = ..., server_round: _Optional[int] = ..., num_examples: _Optional[int] = ..., train_loss: _Optional[float] = ..., peak_memory_mb: _Optional[float] = ..., arrays: _Optional[_Iterable[_Union[NamedArray, _Mapping]]] = ..., dp: _Optional[_Union[_privacy_pb2.DPReport, _Mapping]] = ...) -> None: ...
