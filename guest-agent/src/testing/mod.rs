//! What the agent carries for hostile-guest tests only: tools that attack
//! the host from inside the guest (run as `/init <tool>`, never as PID 1's
//! work) and the rogue vsock driver of `ember.agent=scribble`.

pub mod hostile_guest;
