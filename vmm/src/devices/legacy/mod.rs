//! Legacy PC devices a Linux guest expects: the COM1 UART and the i8042
//! controller (for its reset line).

pub mod console;
pub mod i8042;
pub mod serial;

pub use console::{ConsoleSink, LineWatch};
pub use i8042::I8042;
pub use serial::Serial;
