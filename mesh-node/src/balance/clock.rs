//! Time source for outlier ejection, injectable so tests can step time instead of sleeping.
use std::time::Instant;

pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

#[cfg(test)]
pub(super) mod manual {
    use std::{
        sync::Mutex,
        time::{Duration, Instant},
    };

    /// A clock that only moves when told to.
    pub struct ManualClock(Mutex<Instant>);

    impl ManualClock {
        pub fn new() -> Self {
            Self(Mutex::new(Instant::now()))
        }

        pub fn advance(&self, by: Duration) {
            let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
            *t += by;
        }
    }

    impl super::Clock for ManualClock {
        fn now(&self) -> Instant {
            *self.0.lock().unwrap_or_else(|e| e.into_inner())
        }
    }
}
