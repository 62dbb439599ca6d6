//! Who may connect and what they may do: passwords, ACLs.

pub(crate) mod acl;
pub(crate) mod auth;
pub mod passwd;
pub(crate) mod password;
