"""The few messages of Caffe's ``caffe.proto`` that a ``.caffemodel`` import needs.

A ``.caffemodel`` is one serialised ``caffe.NetParameter``. Rather than ship generated
``caffe_pb2`` code (which needs protoc and pins a protobuf runtime), the schema is declared
here as a ``FileDescriptorProto`` and turned into message classes at run time with
``google.protobuf``'s descriptor pool and message factory. Only the fields the importer reads
are declared; protobuf skips every other field of a real file as unknown.

Field numbers follow caffe.proto. Both layer encodings are covered: the current
``NetParameter.layer`` (``LayerParameter``, field 100) and the legacy ``NetParameter.layers``
(``V1LayerParameter``, field 2) in which ``bvlc_alexnet.caffemodel`` was saved.
"""

from __future__ import annotations

import functools
from typing import Any

# (name, number, label, type, type_name) per field; labels/types as in descriptor_pb2
_OPT, _REP = 1, 3
_INT64, _UINT32, _FLOAT, _STRING, _BOOL, _MSG, _ENUM, _INT32 = 3, 13, 2, 9, 8, 11, 14, 5

_MESSAGES: dict[str, list[tuple[str, int, int, int, str]]] = {
    "BlobShape": [("dim", 1, _REP, _INT64, "")],
    "BlobProto": [
        ("shape", 7, _OPT, _MSG, ".caffe.BlobShape"),
        ("data", 5, _REP, _FLOAT, ""),
        ("double_data", 8, _REP, 1, ""),  # TYPE_DOUBLE
        ("num", 1, _OPT, _INT32, ""),  # legacy 4-D shape
        ("channels", 2, _OPT, _INT32, ""),
        ("height", 3, _OPT, _INT32, ""),
        ("width", 4, _OPT, _INT32, ""),
    ],
    "ConvolutionParameter": [
        ("num_output", 1, _OPT, _UINT32, ""),
        ("bias_term", 2, _OPT, _BOOL, ""),
        # optional in old files, repeated in new ones: the wire format is the same
        ("pad", 3, _REP, _UINT32, ""),
        ("kernel_size", 4, _REP, _UINT32, ""),
        ("group", 5, _OPT, _UINT32, ""),
        ("stride", 6, _REP, _UINT32, ""),
    ],
    "LRNParameter": [
        ("local_size", 1, _OPT, _UINT32, ""),
        ("alpha", 2, _OPT, _FLOAT, ""),
        ("beta", 3, _OPT, _FLOAT, ""),
        ("k", 5, _OPT, _FLOAT, ""),
    ],
    "PoolingParameter": [
        ("kernel_size", 2, _OPT, _UINT32, ""),
        ("stride", 3, _OPT, _UINT32, ""),
        ("pad", 4, _OPT, _UINT32, ""),
    ],
    "InnerProductParameter": [("num_output", 1, _OPT, _UINT32, "")],
    "LayerParameter": [
        ("name", 1, _OPT, _STRING, ""),
        ("type", 2, _OPT, _STRING, ""),
        ("bottom", 3, _REP, _STRING, ""),
        ("top", 4, _REP, _STRING, ""),
        ("blobs", 7, _REP, _MSG, ".caffe.BlobProto"),
        ("convolution_param", 106, _OPT, _MSG, ".caffe.ConvolutionParameter"),
        ("inner_product_param", 117, _OPT, _MSG, ".caffe.InnerProductParameter"),
        ("lrn_param", 118, _OPT, _MSG, ".caffe.LRNParameter"),
        ("pooling_param", 121, _OPT, _MSG, ".caffe.PoolingParameter"),
    ],
    "V1LayerParameter": [
        ("bottom", 2, _REP, _STRING, ""),
        ("top", 3, _REP, _STRING, ""),
        ("name", 4, _OPT, _STRING, ""),
        ("type", 5, _OPT, _ENUM, ".caffe.V1LayerParameter.LayerType"),
        ("blobs", 6, _REP, _MSG, ".caffe.BlobProto"),
        ("convolution_param", 10, _OPT, _MSG, ".caffe.ConvolutionParameter"),
        ("inner_product_param", 17, _OPT, _MSG, ".caffe.InnerProductParameter"),
        ("lrn_param", 18, _OPT, _MSG, ".caffe.LRNParameter"),
        ("pooling_param", 19, _OPT, _MSG, ".caffe.PoolingParameter"),
    ],
    "NetParameter": [
        ("name", 1, _OPT, _STRING, ""),
        ("layers", 2, _REP, _MSG, ".caffe.V1LayerParameter"),
        ("layer", 100, _REP, _MSG, ".caffe.LayerParameter"),
    ],
}

# caffe.proto's V1LayerParameter.LayerType numbers, and the V2 type strings AlexNet's became.
V1_TYPES: dict[str, int] = {
    "NONE": 0,
    "ABSVAL": 35,
    "ACCURACY": 1,
    "ARGMAX": 30,
    "BNLL": 2,
    "CONCAT": 3,
    "CONTRASTIVE_LOSS": 37,
    "CONVOLUTION": 4,
    "DATA": 5,
    "DECONVOLUTION": 39,
    "DROPOUT": 6,
    "DUMMY_DATA": 32,
    "EUCLIDEAN_LOSS": 7,
    "ELTWISE": 25,
    "EXP": 38,
    "FLATTEN": 8,
    "HDF5_DATA": 9,
    "HDF5_OUTPUT": 10,
    "HINGE_LOSS": 28,
    "IM2COL": 11,
    "IMAGE_DATA": 12,
    "INFOGAIN_LOSS": 13,
    "INNER_PRODUCT": 14,
    "LRN": 15,
    "MEMORY_DATA": 29,
    "MULTINOMIAL_LOGISTIC_LOSS": 16,
    "MVN": 34,
    "POOLING": 17,
    "POWER": 26,
    "RELU": 18,
    "SIGMOID": 19,
    "SIGMOID_CROSS_ENTROPY_LOSS": 27,
    "SILENCE": 36,
    "SOFTMAX": 20,
    "SOFTMAX_LOSS": 21,
    "SPLIT": 22,
    "SLICE": 33,
    "TANH": 23,
    "WINDOW_DATA": 24,
    "THRESHOLD": 31,
}
V1_TO_V2: dict[str, str] = {
    "CONVOLUTION": "Convolution",
    "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN",
    "POOLING": "Pooling",
    "RELU": "ReLU",
    "DROPOUT": "Dropout",
    "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss",
    "DATA": "Data",
    "ACCURACY": "Accuracy",
}


def _file_descriptor() -> Any:
    from google.protobuf import descriptor_pb2

    fdp = descriptor_pb2.FileDescriptorProto(
        name="alexnet_caffe_minimal.proto", package="caffe", syntax="proto2"
    )
    for msg_name, fields in _MESSAGES.items():
        msg = fdp.message_type.add(name=msg_name)
        for name, number, label, ftype, type_name in fields:
            field = msg.field.add(name=name, number=number, label=label, type=ftype)
            if type_name:
                field.type_name = type_name
            if label == _REP and ftype in (_INT64, _FLOAT, 1):
                field.options.packed = True  # as caffe.proto declares them
        if msg_name == "V1LayerParameter":
            enum = msg.enum_type.add(name="LayerType")
            for value_name, value in V1_TYPES.items():
                enum.value.add(name=value_name, number=value)
    return fdp


@functools.cache
def messages() -> dict[str, type]:
    """``{"NetParameter": cls, "BlobProto": cls, ...}``, built once per process.

    A private descriptor pool keeps these classes apart from any real ``caffe_pb2`` a user
    has imported (both declare package ``caffe``)."""
    from google.protobuf import descriptor_pool, message_factory

    pool = descriptor_pool.DescriptorPool()
    pool.Add(_file_descriptor())
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"caffe.{name}"))
        for name in _MESSAGES
    }


def blob_shape(blob: Any) -> tuple[int, ...]:
    """A BlobProto's shape: ``shape.dim`` when present, else the legacy num/channels/h/w."""
    if blob.HasField("shape"):
        return tuple(int(d) for d in blob.shape.dim)
    return (int(blob.num), int(blob.channels), int(blob.height), int(blob.width))


def layer_type(layer: Any) -> str:
    """The V2 type string of a LayerParameter or a V1LayerParameter."""
    if isinstance(layer.type, str):
        return layer.type
    enum = layer.DESCRIPTOR.enum_types_by_name["LayerType"]
    name = enum.values_by_number[layer.type].name if layer.type in enum.values_by_number else ""
    return V1_TO_V2.get(name, name or str(layer.type))
