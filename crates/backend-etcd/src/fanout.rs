//! Delivery of the watch cache's events to its subscribers, off the cache's lock. The cache puts
//! each event, and each new subscriber, into one ordered queue while it holds its lock; one task
//! per backend hands every event to every subscriber in that order. A subscriber joins the queue
//! right after its snapshot was taken, so it gets exactly the events after that snapshot; and a
//! claim or release waiting for the cache's lock does not wait for thousands of deliveries.

use agent_core::BackendEvent;
use tokio::sync::mpsc;

enum Item {
    Event(BackendEvent),
    Join(mpsc::UnboundedSender<BackendEvent>),
}

/// The cache's end of the queue.
#[derive(Debug, Clone)]
pub(crate) struct Fanout {
    queue: mpsc::UnboundedSender<Item>,
}

impl std::fmt::Debug for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Item::Event(e) => f.debug_tuple("Event").field(e).finish(),
            Item::Join(_) => f.write_str("Join"),
        }
    }
}

impl Fanout {
    /// The queue, and the task that delivers from it (to be spawned by the backend).
    pub fn new() -> (
        Fanout,
        impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let (queue, mut items) = mpsc::unbounded_channel();
        let deliver = async move {
            let mut subscribers: Vec<mpsc::UnboundedSender<BackendEvent>> = Vec::new();
            while let Some(item) = items.recv().await {
                match item {
                    Item::Event(event) => {
                        subscribers.retain(|tx| tx.send(event.clone()).is_ok());
                    }
                    Item::Join(tx) => subscribers.push(tx),
                }
            }
        };
        (Fanout { queue }, deliver)
    }

    /// Queues `event` for every current subscriber.
    pub fn send(&self, event: BackendEvent) {
        // Fails only once the backend is shutting down: nobody is left to tell.
        let _ = self.queue.send(Item::Event(event));
    }

    /// A new subscriber, getting every event queued from now on.
    pub fn join(&self) -> mpsc::UnboundedReceiver<BackendEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = self.queue.send(Item::Join(tx));
        rx
    }
}
