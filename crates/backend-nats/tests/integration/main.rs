//! Integration tests of the NATS backend against a real nats-server (started per test).

mod claim;
mod conformance;
mod security;
mod watch;
