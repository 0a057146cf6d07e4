//! One shape for what a snapshot keeps of a device: a `*State` value
//! (serde, inside the snapshot's `state` file) that the device saves, and
//! from which an equal device is made again, as Firecracker's `persist.rs`
//! beside each device does.
//!
//! Restoring never trusts the state: it comes from a file, so every
//! implementation validates it against what it is restored into (queue
//! sizes and addresses against guest memory, the drive against the file
//! given) and fails with its own error rather than build a device that
//! would later misbehave.

/// A device (or a device with its transport) that a snapshot saves and
/// restores.
pub trait Persist: Sized {
    /// What the snapshot keeps of it.
    type State;
    /// What making it again needs besides the state: file descriptors,
    /// guest memory, the device a transport drives.
    type ConstructorArgs;
    /// Why a state cannot be restored.
    type Error;

    /// Captures the state (the device must be quiescent: no vCPU and no
    /// event-loop activity).
    fn save(&self) -> Self::State;

    /// Makes the device again from `state`, validating it first.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
