//! NCCL communicator (placeholder while it is written).
