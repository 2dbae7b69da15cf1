//! Formatting an error with its whole chain of sources.
//!
//! `%e` on an error prints only its own message: `datastore unavailable at
//! /var/lib/tabby/datastore`, without the errno that says why. Every log
//! site in Tabby prints [`chain`] instead:
//!
//! ```
//! # use std::io;
//! # #[derive(Debug, thiserror::Error)]
//! # #[error("read the datastore")]
//! # struct ReadError(#[source] io::Error);
//! let e = ReadError(io::Error::from_raw_os_error(13));
//! assert_eq!(
//!     tabby_errors::chain(&e).to_string(),
//!     "read the datastore: Permission denied (os error 13)"
//! );
//! // in a daemon: tracing::warn!(error = %tabby_errors::chain(&e), "reading the datastore failed");
//! ```
//!
//! It is `{:#}` of anyhow for errors that are not `anyhow::Error` (the
//! libraries' thiserror enums), with the same `a: b: c` form. A source whose
//! message its parent already ends with (an error that embeds its cause and
//! also returns it) is printed once.
#![warn(missing_docs)]

use std::error::Error;
use std::fmt;

/// Displays an error and each of its sources, joined by `: `.
#[derive(Clone, Copy)]
pub struct Chain<'a>(&'a (dyn Error + 'a));

/// `error` with all its sources, for `%` in a tracing field or `{}` in a message.
pub fn chain<'a>(error: &'a (dyn Error + 'a)) -> Chain<'a> {
    Chain(error)
}

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut last = self.0.to_string();
        f.write_str(&last)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            let text = e.to_string();
            if !last.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            last = text;
            next = e.source();
        }
        Ok(())
    }
}

impl fmt::Debug for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[derive(Debug, thiserror::Error)]
    enum Inner {
        #[error("open /run/netns/x")]
        Open(#[source] io::Error),
    }

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("program routes")]
        Kernel(#[source] Inner),
        #[error("read config: {0}")]
        Embedded(#[source] io::Error),
    }

    #[test]
    fn every_source_is_printed_after_a_colon() {
        let e = Outer::Kernel(Inner::Open(io::Error::from_raw_os_error(2)));
        assert_eq!(
            chain(&e).to_string(),
            "program routes: open /run/netns/x: No such file or directory (os error 2)"
        );
        assert_eq!(chain(&io::Error::other("plain")).to_string(), "plain");
    }

    #[test]
    fn a_cause_the_message_already_embeds_is_not_repeated() {
        let e = Outer::Embedded(io::Error::other("no such file"));
        assert_eq!(chain(&e).to_string(), "read config: no such file");
    }
}
