from fedtune._proto.v1 import privacy_pb2 as _privacy_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IndexWidth(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INDEX_WIDTH_UNSPECIFIED: _ClassVar[IndexWidth]
    INDEX_WIDTH_UINT16: _ClassVar[IndexWidth]
    INDEX_WIDTH_UINT32: _ClassVar[IndexWidth]

class ScalarDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCALAR_DTYPE_UNSPECIFIED: _ClassVar[ScalarDtype]
    SCALAR_DTYPE_FLOAT32: _ClassVar[ScalarDtype]
    SCALAR_DTYPE_FLOAT16: _ClassVar[ScalarDtype]
INDEX_WIDTH_UNSPECIFIED: IndexWidth
INDEX_WIDTH_UINT16: IndexWidth
INDEX_WIDTH_UINT32: IndexWidth
SCALAR_DTYPE_UNSPECIFIED: ScalarDtype
SCALAR_DTYPE_FLOAT32: ScalarDtype
SCALAR_DTYPE_FLOAT16: ScalarDtype

class DenseAccumulator(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: bytes
    def __init__(self, values: _Optional[bytes] = ...) -> None: ...

class SparseAccumulatorDelta(_message.Message):
    __slots__ = ("base_round", "index_width", "indices", "values")
    BASE_ROUND_FIELD_NUMBER: _ClassVar[int]
    INDEX_WIDTH_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    base_round: int
    index_width: IndexWidth
    indices: bytes
    values: bytes
    def __init__(self, base_round: _Optional[int] = ..., index_width: _Optional[_Union[IndexWidth, str]] = ..., indices: _Optional[bytes] = ..., values: _Optional[bytes] = ...) -> None: ...

class KSeedSync(_message.Message):
    __slots__ = ("schema_version", "server_round", "lr", "eps", "num_local_steps", "batch_size", "num_seeds", "fingerprint", "dense", "sparse_delta", "quantized_probabilities")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_ROUND_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    NUM_LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_SEEDS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_DELTA_FIELD_NUMBER: _ClassVar[int]
    QUANTIZED_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    server_round: int
    lr: float
    eps: float
    num_local_steps: int
    batch_size: int
    num_seeds: int
    fingerprint: str
    dense: DenseAccumulator
    sparse_delta: SparseAccumulatorDelta
    quantized_probabilities: bytes
    def __init__(self, schema_version: _Optional[int] = ..., server_round: _Optional[int] = ..., lr: _Optional[float] = ..., eps: _Optional[float] = ..., num_local_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., num_seeds: _Optional[int] = ..., fingerprint: _Optional[str] = ..., dense: _Optional[_Union[DenseAccumulator, _Mapping]] = ..., sparse_delta: _Optional[_Union[SparseAccumulatorDelta, _Mapping]] = ..., quantized_probabilities: _Optional[bytes] = ...) -> None: ...

class KSeedReply(_message.Message):
    __slots__ = ("schema_version", "server_round", "num_examples", "index_width", "seed_indices", "scalar_dtype", "projected_grads", "train_loss", "num_skipped_steps", "peak_memory_mb", "fingerprint", "dp")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    INDEX_WIDTH_FIELD_NUMBER: _ClassVar[int]
    SEED_INDICES_FIELD_NUMBER: _ClassVar[int]
    SCALAR_DTYPE_FIELD_NUMBER: _ClassVar[int]
    PROJECTED_GRADS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    NUM_SKIPPED_STEPS_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DP_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    server_round: int
    num_examples: int
    index_width: IndexWidth
    seed_indices: bytes
    scalar_dtype: ScalarDtype
    projected_grads: bytes
    train_loss: float
    num_skipped_steps: int
    peak_memory_mb: float
    fingerprint: str
    dp: _privacy_pb2.DPReport
    def __init__(self, schema_version: _Optional[int] = ..., server_round: _Optional[int] = ..., num_examples: _Optional[int] = ..., index_width: _Optional[_Union[IndexWidth, str]] = ..., seed_indices: _Optional[bytes] = ..., scalar_dtype: _Optional[_Union[ScalarDtype, str]] = ..., projected_grads: _Optional[bytes] = ..., train_loss: _Optional[float] = ..., num_skipped_steps: _Optional[int] = ..., peak_memory_mb: _Optional[float] = ..., fingerprint: _Optional[str] = ..., dp: _Optional[_Union[_privacy_pb2.DPReport, _Mapping]] = ...) -> None: ...
