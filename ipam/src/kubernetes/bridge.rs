//! A tokio runtime of the backend's own, on a dedicated thread, and a
//! blocking call into it that works from any thread.
//!
//! The [`crate::Datastore`] trait is synchronous. Its callers are a plain
//! process (the CNI plugin) or a thread of a tokio runtime (the agent,
//! through `spawn_blocking`). `Runtime::block_on` panics inside a runtime,
//! so each call is spawned onto the bridge's runtime and waited for with
//! `futures::executor::block_on` on a oneshot channel, which needs no
//! runtime. Dropping the bridge stops its thread (the runtime is dropped
//! there, never inside a caller's async context).

use std::future::Future;
use std::io;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The backend's runtime thread.
#[derive(Debug)]
pub struct Bridge {
    handle: Handle,
    _stop: oneshot::Sender<()>,
}

impl Bridge {
    /// Starts the thread and its current-thread runtime.
    pub fn start() -> io::Result<Self> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("tabby-kube".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(runtime.handle().clone()));
                // Runs every spawned call until the bridge is dropped.
                runtime.block_on(async {
                    let _ = stop_rx.await;
                });
            })?;
        let handle = ready_rx
            .recv()
            .map_err(|_| io::Error::other("the Kubernetes client thread died while starting"))??;
        Ok(Self {
            handle,
            _stop: stop_tx,
        })
    }

    /// Runs `fut` on the bridge's runtime and blocks the calling thread
    /// until it is done; `None` if the runtime went away first.
    pub fn run<T, F>(&self, fut: F) -> Option<T>
    where
        T: Send + 'static,
        F: Future<Output = T> + Send + 'static,
    {
        let (tx, rx) = futures::channel::oneshot::channel();
        self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        futures::executor::block_on(rx).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_work_from_a_plain_thread_and_from_inside_another_runtime() {
        let bridge = std::sync::Arc::new(Bridge::start().unwrap());
        assert_eq!(bridge.run(async { 1 + 1 }), Some(2));
        let outer = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let inner = bridge.clone();
        let got = outer.block_on(async move {
            // Even straight on a worker thread (spawn_blocking is the polite way).
            let direct = inner.run(async { 3 });
            let blocking = tokio::task::spawn_blocking(move || inner.run(async { 4 }))
                .await
                .unwrap();
            (direct, blocking)
        });
        assert_eq!(got, (Some(3), Some(4)));
        drop(outer);
        drop(bridge);
    }
}
