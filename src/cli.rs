//! The binary's command line: the broker's flags (`config::Flags`) and the
//! `fanmq` subcommands.

use clap::Parser;

use crate::config::Flags;
use crate::security::passwd::PasswdArgs;

/// The `fanmq` command line.
#[derive(Parser, Debug, Default, Clone)]
#[command(
    name = "fanmq",
    version,
    about = "An MQTT 5.0 and 3.1.1 broker for massive fan-out",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// Flags that override the configuration file.
    #[command(flatten)]
    pub flags: Flags,
    /// A tool instead of the broker (none: run the broker).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The `fanmq` subcommands; without one, `fanmq` runs the broker.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Command {
    /// Manage a password file, like mosquitto_passwd.
    Passwd(PasswdArgs),
}
