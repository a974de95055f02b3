from fedtune._proto.v1 import lora_pb2 as _lora_pb2
from fedtune._proto.v1 import privacy_pb2 as _privacy_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SplitRound(_message.Message):
    __slots__ = ("schema_version", "server_round", "address", "stream_id", "token", "steps", "batch_size", "class_names", "root_certificates", "head")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_ROUND_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    ROOT_CERTIFICATES_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    server_round: int
    address: str
    stream_id: str
    token: str
    steps: int
    batch_size: int
    class_names: _containers.RepeatedScalarFieldContainer[str]
    root_certificates: bytes
    head: _containers.RepeatedCompositeFieldContainer[_lora_pb2.NamedArray]
    def __init__(self, schema_version: _Optional[int] = ..., server_round: _Optional[int] = ..., address: _Optional[str] = ..., stream_id: _Optional[str] = ..., token: _Optional[str] = ..., steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., class_names: _Optional[_Iterable[str]] = ..., root_certificates: _Optional[bytes] = ..., head: _Optional[_Iterable[_Union[_lora_pb2.NamedArray, _Mapping]]] = ...) -> None: ...

class SplitReply(_message.Message):
    __slots__ = ("schema_version", "server_round", "steps_done", "num_examples", "train_loss", "bytes_up_per_step", "bytes_down_per_step", "step_ms", "noised_norm", "noise_norm", "peak_memory_mb", "head", "dp")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_ROUND_FIELD_NUMBER: _ClassVar[int]
    STEPS_DONE_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    BYTES_UP_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    BYTES_DOWN_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    STEP_MS_FIELD_NUMBER: _ClassVar[int]
    NOISED_NORM_FIELD_NUMBER: _ClassVar[int]
    NOISE_NORM_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    DP_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    server_round: int
    steps_done: int
    num_examples: int
    train_loss: float
    bytes_up_per_step: float
    bytes_down_per_step: float
    step_ms: float
    noised_norm: float
    noise_norm: float
    peak_memory_mb: float
    head: _containers.RepeatedCompositeFieldContainer[_lora_pb2.NamedArray]
    dp: _privacy_pb2.DPReport
    def __init__(self, schema_version: _Optional[int] = ..., server_round: _Optional[int] = ..., steps_done: _Optional[int] = ..., num_examples: _Optional[int] = ..., train_loss: _Optional[float] = ..., bytes_up_per_step: _Optional[float] = ..., bytes_down_per_step: _Optional[float] = ..., step_ms: _Optional[float] = ..., noised_norm: _Optional[float] = ..., noise_norm: _Optional[float] = ..., peak_memory_mb: _Optional[float] = ..., head: _Optional[_Iterable[_Union[_lora_pb2.NamedArray, _Mapping]]] = ..., dp: _Optional[_Union[_privacy_pb2.DPReport, _Mapping]] = ...) -> None: ...
