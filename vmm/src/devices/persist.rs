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

#[cfg(test)]
mod tests {
    use crate::devices::set::DeviceStates;

    /// The devices' part of a snapshot `state` payload as written by ember
    /// before the devices' states had one trait (`ember snapshot create
    /// --root-drive`): serial, the vsock transport (three queues) and a
    /// root drive's transport (one queue) with its drive, no code drive.
    const DEVICES_V4: [u8; 137] = [
        0x0c, 0x00, 0x05, 0x01, 0x13, 0x60, 0x0b, 0xb0, 0x00, 0x00, 0x0f, 0x80, 0x80, 0x80, 0x80,
        0x10, 0x02, 0x00, 0x00, 0x00, 0x01, 0x03, 0x80, 0x02, 0x80, 0x02, 0x01, 0x80, 0x80, 0xce,
        0x01, 0x80, 0xa0, 0xce, 0x01, 0x80, 0xc0, 0xce, 0x01, 0x03, 0x03, 0x00, 0x80, 0x02, 0x80,
        0x02, 0x01, 0x80, 0x80, 0xcf, 0x01, 0x80, 0xa0, 0xcf, 0x01, 0x80, 0xc0, 0xcf, 0x01, 0x03,
        0x03, 0x00, 0x10, 0x10, 0x01, 0x80, 0x80, 0xcd, 0x01, 0x80, 0x82, 0xcd, 0x01, 0x80, 0xa0,
        0xcd, 0x01, 0x00, 0x00, 0x00, 0x01, 0x0f, 0xe6, 0x84, 0x80, 0x80, 0x10, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x01, 0x80, 0x02, 0x80, 0x02, 0x01, 0x80, 0x80, 0xc0, 0x01, 0x80, 0xa0, 0xc0,
        0x01, 0x80, 0xc0, 0xc0, 0x01, 0x09, 0x09, 0x00, 0x05, 0x64, 0x72, 0x69, 0x76, 0x65, 0x80,
        0x80, 0xc0, 0x49, 0x95, 0xc1, 0xe9, 0x04, 0xe4, 0xda, 0xb4, 0xb1, 0x0d, 0x92, 0xdb, 0xbc,
        0x4c, 0x00,
    ];

    #[test]
    fn saved_device_states_keep_their_encoding() {
        let states: DeviceStates = postcard::from_bytes(&DEVICES_V4).unwrap();
        assert_eq!(states.vsock.transport.queues.len(), 3);
        assert_eq!(states.vsock.transport.queues[0].max_size, 256);
        let block = states.block.as_ref().unwrap();
        assert_eq!(block.transport.queues.len(), 1);
        assert_eq!(block.drive.path, b"drive");
        assert!(states.code.is_none());
        assert_eq!(postcard::to_stdvec(&states).unwrap(), DEVICES_V4);
    }
}
