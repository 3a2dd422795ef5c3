"""Data: the Doc schema, format converters, shards, operators, packing and the synthetic world."""

from mmgen.data.doc import Audio, BadRecord, Doc, Image, Item, Text, Video  # noqa: F401
