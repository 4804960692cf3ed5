//! opensim-chat-relay (skeleton).
pub mod sim;
