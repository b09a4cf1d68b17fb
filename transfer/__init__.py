"""Data plane: ``MultimodalDataBuffers`` and the transports that write into them."""

from transfer.allocator import BlockAllocator, DoubleFreeError
from transfer.base import (
    Destination,
    Segment,
    TransferError,
    TransferReceiver,
    TransferSender,
    TransferState,
    plan_segments,
)
from transfer.buffers import DTYPES, BlockAddresses, MultimodalDataBuffers, dtype_name
from transfer.checksum import rows_checksum
from transfer.registry import BACKENDS, make_receiver, make_sender

__all__ = [
    "BACKENDS",
    "DTYPES",
    "BlockAddresses",
    "BlockAllocator",
    "Destination",
    "DoubleFreeError",
    "MultimodalDataBuffers",
    "Segment",
    "TransferError",
    "TransferReceiver",
    "TransferSender",
    "TransferState",
    "dtype_name",
    "make_receiver",
    "make_sender",
    "plan_segments",
    "rows_checksum",
]
