//! Shared helpers for integration tests that boot real microVMs.
