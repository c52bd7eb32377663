//! The L4 path of a connection, in the order it takes: [`route`] (where a captured connection
//! goes: a Service port through its VirtualService `tcp` routes, or a pod), then, once an
//! endpoint is picked, [`upstream`] (how to reach it: a local mesh pod after [`authz`], a mesh
//! pod on another node through a [`tunnel`] over [`hbone`] mutual TLS, anything outside the mesh
//! directly). [`dial`] holds the socket operations both ends share, [`pipe`] the byte pump,
//! [`gather`] the merging of small writes (into tunnel streams, on HTTP/2 connections). On the
//! receiving side, [`forwarded`] checks the source address a tunnel carries, and [`admitted`]
//! keeps the connections admitted to local pods so a policy change reaches them.
pub mod admitted;
pub mod authz;
pub mod dial;
pub mod forwarded;
pub mod gather;
pub mod hbone;
pub mod pipe;
pub mod route;
pub mod tunnel;
pub mod upstream;
