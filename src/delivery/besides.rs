//! The shared read beside the POSTs (`beside`) against a scripted CMS whose reads wait for a gate:
//! behind a backlog the POSTs go on while the read is on its way, the read settles only the batches
//! answered before it was sent, and a read beside that fails leaves the next read to the step.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use super::tests::{ALICE, CAROL, Rig, now_said, rig};
use super::*;

/// Ten lines behind, two a batch, with every read held at a closed gate.
async fn rig_behind_with_slow_reads() -> (Rig, Arc<Semaphore>) {
    let mut rig = rig(3);
    rig.delivery.deps.settings.batch_max_messages = 2;
    let gate = Arc::new(Semaphore::new(0));
    rig.cms.with(|m| m.read_gate = Some(gate.clone()));
    let lines: Vec<_> = (0..10)
        .map(|i| now_said(if i % 2 == 0 { ALICE } else { CAROL }, &format!("l{i}")))
        .collect();
    rig.say(&lines).await;
    (rig, gate)
}

/// One step, which must not wait for the held read.
async fn step(rig: &Rig) -> Result<DeliveryOutcome, DeliveryError> {
    tokio::time::timeout(Duration::from_secs(5), rig.delivery.try_deliver_batch())
        .await
        .expect("a step waited for a read held by the CMS")
}

/// Lets the spawned read run to its answer.
async fn let_the_read_answer() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn behind_a_backlog_the_posts_go_on_while_the_shared_read_is_on_its_way() {
    let (rig, gate) = rig_behind_with_slow_reads().await;

    // Five steps post all five batches: the read that became due after the third goes beside.
    for _ in 0..5 {
        step(&rig).await.expect("step");
    }
    assert_eq!(rig.cms.with(|m| m.n_posts), 5);
    assert_eq!(rig.cms.relay_messages().len(), 10);
    assert_eq!(rig.counted(), 0, "nothing is proven before a read");

    // The read answers: it settles the three batches answered before it was sent, no more.
    gate.add_permits(1);
    let_the_read_answer().await;
    step(&rig).await.expect("step");
    assert_eq!(rig.counted(), 6);

    // The last two batches wait for a read of their own, made in the step now that nothing else
    // is to be sent.
    gate.add_permits(10);
    rig.steps(5).await;
    assert_eq!(rig.counted(), 10);
    assert_eq!(rig.cms.relay_messages().len(), 10, "nothing sent twice");
    assert!(rig.outbox.is_empty());
}

#[tokio::test]
async fn a_read_beside_that_fails_leaves_the_next_read_to_the_step_and_loses_nothing() {
    let (rig, gate) = rig_behind_with_slow_reads().await;
    rig.cms.with(|m| m.max_read_rows = 0);
    for _ in 0..5 {
        step(&rig).await.expect("step");
    }
    gate.add_permits(1);
    let_the_read_answer().await;
    // The failed read beside settles nothing; the step's own read (and its probe) fails too (the
    // CMS's memory limit), and the lines wait for their retry.
    gate.add_permits(100);
    let _ = step(&rig).await;
    assert_eq!(rig.counted(), 0);
    assert!(lock(&rig.delivery.beside).task.is_none());

    rig.cms.with(|m| m.max_read_rows = usize::MAX);
    for _ in 0..20 {
        if rig.outbox.is_empty() {
            break;
        }
        let _ = step(&rig).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(rig.counted(), 10);
    assert_eq!(rig.cms.relay_messages().len(), 10, "nothing sent twice");
    assert_eq!(rig.dead(), Vec::<String>::new());
    assert!(rig.outbox.is_empty());
}
