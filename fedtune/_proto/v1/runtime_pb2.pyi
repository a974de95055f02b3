from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_CODE_UNSPECIFIED: _ClassVar[ErrorCode]
    ERROR_CODE_CLIENT_EXCEPTION: _ClassVar[ErrorCode]
    ERROR_CODE_STALE_SYNC: _ClassVar[ErrorCode]
    ERROR_CODE_BAD_PAYLOAD: _ClassVar[ErrorCode]
    ERROR_CODE_BAD_NODE_CONFIG: _ClassVar[ErrorCode]
ERROR_CODE_UNSPECIFIED: ErrorCode
ERROR_CODE_CLIENT_EXCEPTION: ErrorCode
ERROR_CODE_STALE_SYNC: ErrorCode
ERROR_CODE_BAD_PAYLOAD: ErrorCode
ERROR_CODE_BAD_NODE_CONFIG: ErrorCode

class ClientError(_message.Message):
    __slots__ = ("schema_version", "server_round", "code", "message", "held_version")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_ROUND_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    HELD_VERSION_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    server_round: int
    code: ErrorCode
    message: str
    held_version: int
    def __init__(self, schema_version: _Optional[int] = ..., server_round: _Optional[int] = ..., code: _Optional[_Union[ErrorCode, str]] = ..., message: _Optional[str] = ..., held_version: _Optional[int] = ...) -> None: ...
