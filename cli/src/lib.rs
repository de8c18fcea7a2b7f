//! The `weft` CLI's library: the local cluster ([`cluster`]), waypoint management
//! ([`waypoint`]), looking inside the mesh ([`inspect`]) and the `weft-echo` test application
//! ([`echo`]).
//!
//! Does not own any mesh component; it runs them.

pub mod cluster;
pub mod demo;
pub mod echo;
pub mod inspect;
pub mod waypoint;
