//! End-to-end tests: each starts the real `fanmq` binary on a free port and
//! talks to it with real clients (`rumqttc`) and raw TCP bytes.

mod common;

mod admin;
mod auth;
mod basic;
mod cluster;
mod hostile;
mod limits;
mod mqtt5;
mod park;
mod persistence;
mod protocol;
mod proxy;
mod qos;
mod reliability;
mod retain_will;
mod sessions;
mod shared;
mod startup;
mod systemd;
mod tls;
mod websocket;
