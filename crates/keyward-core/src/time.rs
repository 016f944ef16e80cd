//! Time as keyward stores it: milliseconds since the Unix epoch, UTC.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct UnixMillis(pub i64);

impl UnixMillis {
    pub fn as_i64(self) -> i64 {
        self.0
    }
}
