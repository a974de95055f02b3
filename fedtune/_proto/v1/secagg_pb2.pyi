from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SecAggEnvelope(_message.Message):
    __slots__ = ("schema_version", "stage", "body", "inner", "reply")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    INNER_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    stage: int
    body: bytes
    inner: bytes
    reply: bool
    def __init__(self, schema_version: _Optional[int] = ..., stage: _Optional[int] = ..., body: _Optional[bytes] = ..., inner: _Optional[bytes] = ..., reply: _Optional[bool] = ...) -> None: ...

class SecAggSetup(_message.Message):
    __slots__ = ("schema_version", "run_key", "server_round", "participants", "threshold", "vector_length", "fraction_bits", "clip")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_KEY_FIELD_NUMBER: _ClassVar[int]
    SERVER_ROUND_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    VECTOR_LENGTH_FIELD_NUMBER: _ClassVar[int]
    FRACTION_BITS_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    run_key: str
    server_round: int
    participants: _containers.RepeatedScalarFieldContainer[int]
    threshold: int
    vector_length: int
    fraction_bits: int
    clip: float
    def __init__(self, schema_version: _Optional[int] = ..., run_key: _Optional[str] = ..., server_round: _Optional[int] = ..., participants: _Optional[_Iterable[int]] = ..., threshold: _Optional[int] = ..., vector_length: _Optional[int] = ..., fraction_bits: _Optional[int] = ..., clip: _Optional[float] = ...) -> None: ...

class SecAggKeysReply(_message.Message):
    __slots__ = ("schema_version", "node_id", "c_public", "s_public")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    C_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    S_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    node_id: int
    c_public: bytes
    s_public: bytes
    def __init__(self, schema_version: _Optional[int] = ..., node_id: _Optional[int] = ..., c_public: _Optional[bytes] = ..., s_public: _Optional[bytes] = ...) -> None: ...

class SecAggNodeKeys(_message.Message):
    __slots__ = ("node_id", "c_public", "s_public")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    C_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    S_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    c_public: bytes
    s_public: bytes
    def __init__(self, node_id: _Optional[int] = ..., c_public: _Optional[bytes] = ..., s_public: _Optional[bytes] = ...) -> None: ...

class SecAggKeysBroadcast(_message.Message):
    __slots__ = ("schema_version", "keys")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    keys: _containers.RepeatedCompositeFieldContainer[SecAggNodeKeys]
    def __init__(self, schema_version: _Optional[int] = ..., keys: _Optional[_Iterable[_Union[SecAggNodeKeys, _Mapping]]] = ...) -> None: ...

class SecAggCiphertext(_message.Message):
    __slots__ = ("node_id", "ciphertext")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    ciphertext: bytes
    def __init__(self, node_id: _Optional[int] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class SecAggSharesReply(_message.Message):
    __slots__ = ("schema_version", "node_id", "ciphertexts")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    node_id: int
    ciphertexts: _containers.RepeatedCompositeFieldContainer[SecAggCiphertext]
    def __init__(self, schema_version: _Optional[int] = ..., node_id: _Optional[int] = ..., ciphertexts: _Optional[_Iterable[_Union[SecAggCiphertext, _Mapping]]] = ...) -> None: ...

class SecAggMaskRequest(_message.Message):
    __slots__ = ("schema_version", "participants_u2", "ciphertexts")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_U2_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    participants_u2: _containers.RepeatedScalarFieldContainer[int]
    ciphertexts: _containers.RepeatedCompositeFieldContainer[SecAggCiphertext]
    def __init__(self, schema_version: _Optional[int] = ..., participants_u2: _Optional[_Iterable[int]] = ..., ciphertexts: _Optional[_Iterable[_Union[SecAggCiphertext, _Mapping]]] = ...) -> None: ...

class SecAggMaskedInput(_message.Message):
    __slots__ = ("schema_version", "node_id", "masked", "clipped")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MASKED_FIELD_NUMBER: _ClassVar[int]
    CLIPPED_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    node_id: int
    masked: bytes
    clipped: int
    def __init__(self, schema_version: _Optional[int] = ..., node_id: _Optional[int] = ..., masked: _Optional[bytes] = ..., clipped: _Optional[int] = ...) -> None: ...

class SecAggUnmaskRequest(_message.Message):
    __slots__ = ("schema_version", "survivors", "dropped")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    survivors: _containers.RepeatedScalarFieldContainer[int]
    dropped: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, schema_version: _Optional[int] = ..., survivors: _Optional[_Iterable[int]] = ..., dropped: _Optional[_Iterable[int]] = ...) -> None: ...

class SecAggShare(_message.Message):
    __slots__ = ("node_id", "share")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    share: bytes
    def __init__(self, node_id: _Optional[int] = ..., share: _Optional[bytes] = ...) -> None: ...

class SecAggUnmaskReply(_message.Message):
    __slots__ = ("schema_version", "node_id", "b_shares", "s_shares")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    B_SHARES_FIELD_NUMBER: _ClassVar[int]
    S_SHARES_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    node_id: int
    b_shares: _containers.RepeatedCompositeFieldContainer[SecAggShare]
    s_shares: _containers.RepeatedCompositeFieldContainer[SecAggShare]
    def __init__(self, schema_version: _Optional[int] = ..., node_id: _Optional[int] = ..., b_shares: _Optional[_Iterable[_Union[SecAggShare, _Mapping]]] = ..., s_shares: _Optional[_Iterable[_Union[SecAggShare, _Mapping]]] = ...) -> None: ...

class SecAggClientState(_message.Message):
    __slots__ = ("schema_version", "stage", "node_id", "setup", "c_private", "s_private", "keys", "self_mask_seed", "own_b_share", "own_s_share", "participants_u2", "ciphertexts")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SETUP_FIELD_NUMBER: _ClassVar[int]
    C_PRIVATE_FIELD_NUMBER: _ClassVar[int]
    S_PRIVATE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SELF_MASK_SEED_FIELD_NUMBER: _ClassVar[int]
    OWN_B_SHARE_FIELD_NUMBER: _ClassVar[int]
    OWN_S_SHARE_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_U2_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    stage: int
    node_id: int
    setup: SecAggSetup
    c_private: bytes
    s_private: bytes
    keys: SecAggKeysBroadcast
    self_mask_seed: bytes
    own_b_share: bytes
    own_s_share: bytes
    participants_u2: _containers.RepeatedScalarFieldContainer[int]
    ciphertexts: _containers.RepeatedCompositeFieldContainer[SecAggCiphertext]
    def __init__(self, schema_version: _Optional[int] = ..., stage: _Optional[int] = ..., node_id: _Optional[int] = ..., setup: _Optional[_Union[SecAggSetup, _Mapping]] = ..., c_private: _Optional[bytes] = ..., s_private: _Optional[bytes] = ..., keys: _Optional[_Union[SecAggKeysBroadcast, _Mapping]] = ..., self_mask_seed: _Optional[bytes] = ..., own_b_share: _Optional[bytes] = ..., own_s_share: _Optional[bytes] = ..., participants_u2: _Optional[_Iterable[int]] = ..., ciphertexts: _Optional[_Iterable[_Union[SecAggCiphertext, _Mapping]]] = ...) -> None: ...
