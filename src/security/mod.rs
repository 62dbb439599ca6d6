//! Who may connect and what they may do: passwords, ACLs.

pub mod acl;
pub mod auth;
pub mod passwd;
pub mod password;
