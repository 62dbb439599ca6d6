//! Shared subscriptions (`$share/{ShareName}/{filter}`, MQTT 5.0 §4.8.2,
//! accepted from 3.1.1 clients too) across two shards: `rumqttc` v4 and
//! `rumqttc::v5` members side by side, raw bytes for the refusals.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rumqttc::QoS;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode as SubscribeReasonCode5;
use serde_json::Value;

use crate::admin::{get_json, wait_stats};
use crate::common::*;
use crate::mqtt5::{V5, raw_v5, subscribe_v5};
use rumqttc::v5::mqttbytes::v5::{Filter as Filter5, Publish as Publish5, UnsubAckReason};

/// A group member of either version.
enum Member {
    /// MQTT 3.1.1 (`rumqttc` v4).
    V4(Mqtt),
    /// MQTT 5.0.
    V5(V5),
}

impl Member {
    /// A 3.1.1 member of `filter`.
    fn v4(port: u16, client_id: &str, filter: &str) -> Member {
        let mut mqtt = Mqtt::connect(port, client_id);
        let codes = mqtt.subscribe(filter, QoS::AtLeastOnce);
        assert_eq!(
            codes,
            vec![rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
        );
        Member::V4(mqtt)
    }

    /// A 5.0 member of `filter`.
    fn v5(port: u16, client_id: &str, filter: &str) -> Member {
        let mut v5 = V5::connect(port, client_id);
        let codes = v5.subscribe(filter, QoS5::AtLeastOnce);
        assert_eq!(
            codes,
            vec![SubscribeReasonCode5::Success(QoS5::AtLeastOnce)]
        );
        Member::V5(v5)
    }

    /// A payload received within `timeout`, if any.
    fn recv(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        match self {
            Member::V4(mqtt) => mqtt.recv_publish(timeout).map(|p| p.payload.to_vec()),
            Member::V5(v5) => v5.recv_publish(timeout).map(|p| p.payload.to_vec()),
        }
    }
}

/// Polls `/api/v1/shared` until every shard's replica holds `members`
/// members (membership changes reach the other shards over the mesh).
fn wait_replicas(broker: &Broker, members: u64) -> Value {
    wait_replicas_connected(broker, members, members)
}

/// [`wait_replicas`], `connected` of them connected.
fn wait_replicas_connected(broker: &Broker, members: u64, connected: u64) -> Value {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let shared = get_json(broker, "/api/v1/shared");
        let replicas = shared["replicas"].as_array().cloned().unwrap_or_default();
        if !replicas.is_empty()
            && replicas
                .iter()
                .all(|r| r["members"] == members && r["connected"] == connected)
        {
            return shared;
        }
        assert!(
            Instant::now() < deadline,
            "replicas never reached {members} members: {shared}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A client `prefix-N` connected on another shard than `avoid`.
fn connect_elsewhere(broker: &Broker, prefix: &str, avoid: usize) -> Mqtt {
    for i in 0..64 {
        let id = format!("{prefix}-{i}");
        let client = Mqtt::connect(broker.port, &id);
        if broker.shard_of(&id) != avoid {
            return client;
        }
    }
    panic!("64 connections of {prefix} all landed on shard {avoid}");
}

/// A `rumqttc::v5` client `prefix-N` connected on shard `shard`.
fn v5_on(broker: &Broker, prefix: &str, shard: usize) -> V5 {
    for i in 0..64 {
        let id = format!("{prefix}-{i}");
        let client = V5::connect(broker.port, &id);
        if broker.shard_of(&id) == shard {
            return client;
        }
    }
    panic!("64 connections of {prefix} all missed shard {shard}");
}

/// A persistent 3.1.1 session `client_id`, the only member of the group
/// `share` (QoS 1), once every replica has it; with the options to take it
/// over.
fn persistent_member(
    broker: &Broker,
    client_id: &str,
    share: &str,
) -> (Mqtt, rumqttc::MqttOptions) {
    let mut options = Mqtt::options(broker.port, client_id);
    options.set_clean_session(false);
    let (mut member, _) = Mqtt::connect_with(options.clone());
    member.subscribe(share, QoS::AtLeastOnce);
    wait_replicas(broker, 1);
    (member, options)
}

/// Receives from `members` until `count` payloads arrived in all, then
/// drains what else is there; returns each member's payloads.
fn collect(members: &mut [Member], count: usize) -> Vec<Vec<Vec<u8>>> {
    let mut got: Vec<Vec<Vec<u8>>> = vec![Vec::new(); members.len()];
    let deadline = Instant::now() + TIMEOUT;
    while got.iter().map(Vec::len).sum::<usize>() < count {
        assert!(
            Instant::now() < deadline,
            "only {} of {count} messages arrived: {:?}",
            got.iter().map(Vec::len).sum::<usize>(),
            got.iter().map(Vec::len).collect::<Vec<_>>()
        );
        for (i, member) in members.iter_mut().enumerate() {
            while let Some(p) = member.recv(Duration::from_millis(5)) {
                got[i].push(p);
            }
        }
    }
    // A duplicate would have arrived by now with the rest.
    for (i, member) in members.iter_mut().enumerate() {
        while let Some(p) = member.recv(Duration::from_millis(200)) {
            got[i].push(p);
        }
    }
    got
}

/// Asserts that `got` (per member) holds each of `expected` exactly once.
fn assert_once_each(got: &[Vec<Vec<u8>>], expected: &[Vec<u8>], what: &str) {
    let mut seen: HashMap<&[u8], usize> = HashMap::new();
    for p in got.iter().flatten() {
        *seen.entry(p.as_slice()).or_default() += 1;
    }
    for e in expected {
        assert_eq!(
            seen.get(e.as_slice()),
            Some(&1),
            "{what}: {:?}",
            String::from_utf8_lossy(e)
        );
    }
    assert_eq!(seen.len(), expected.len(), "{what}: unexpected payloads");
}

/// A `rumqttc::v5` member `client_id` of `share` (QoS 1) that acknowledges
/// nothing by itself and takes at most `in_flight` messages in flight
/// (Receive Maximum): the rest of what its group gives it waits in its
/// pending queue.
fn slow_member(port: u16, client_id: &str, share: &str, in_flight: usize) -> V5 {
    let mut options = V5::options(port, client_id);
    options.set_manual_acks(true);
    options.set_receive_maximum(u16::try_from(in_flight).ok());
    let (mut slow, _) = V5::connect_with(options);
    slow.subscribe(share, QoS5::AtLeastOnce);
    slow
}

/// The payloads `prefix-0` .. `prefix-(n-1)`.
fn payloads(prefix: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("{prefix}-{i}").into_bytes())
        .collect()
}

#[test]
fn a_group_of_v5_and_v3_members_shares_300_messages_once_each_beside_a_second_group_and_a_plain_subscriber()
 {
    const COUNT: usize = 300;
    let broker = Broker::start();
    let port = broker.port;
    let mut group = vec![
        Member::v5(port, "sh-a", "$share/g1/sh/t"),
        Member::v4(port, "sh-b", "$share/g1/sh/t"),
        Member::v5(port, "sh-c", "$share/g1/sh/t"),
    ];
    let mut second = vec![
        Member::v4(port, "sh-d", "$share/g2/sh/+"),
        Member::v5(port, "sh-e", "$share/g2/sh/+"),
    ];
    let mut plain = vec![Member::v4(port, "sh-plain", "sh/t")];
    let shards: HashSet<usize> = ["sh-a", "sh-b", "sh-c"]
        .iter()
        .map(|id| broker.shard_of(id))
        .collect();
    let shared = wait_replicas(&broker, 5);
    assert_eq!(shared["total"], 5, "{shared}");
    assert_eq!(
        shared["groups"].as_array().map(Vec::len),
        Some(2),
        "{shared}"
    );
    // The publisher is on another shard than at least one member.
    let avoid = *shards.iter().next().expect("a shard");
    let publisher = connect_elsewhere(&broker, "sh-pub", avoid);
    let expected = payloads("m", COUNT);
    for p in &expected {
        publisher.publish("sh/t", QoS::AtLeastOnce, false, p);
    }
    let got = collect(&mut group, COUNT);
    assert_once_each(&got, &expected, "group g1");
    for (i, member) in got.iter().enumerate() {
        assert!(!member.is_empty(), "round robin: member {i} got nothing");
    }
    assert_once_each(&collect(&mut second, COUNT), &expected, "group g2");
    assert_once_each(&collect(&mut plain, COUNT), &expected, "plain subscriber");
    crate::admin::wait_stats(&broker, |s| {
        crate::admin::total(s, "shared_deliveries") == 2 * COUNT as u64
            && crate::admin::total(s, "shared_groups") == 2
            && crate::admin::total(s, "shared_members") == 5
            && crate::admin::total(s, "subscriptions") == 6
    });
}

#[test]
fn after_a_member_disconnects_the_others_get_every_message() {
    let broker = Broker::start();
    let port = broker.port;
    let mut members = vec![
        Member::v4(port, "dc-a", "$share/g/dc"),
        Member::v5(port, "dc-b", "$share/g/dc"),
    ];
    let mut leaving = Mqtt::connect(port, "dc-c");
    leaving.subscribe("$share/g/dc", QoS::AtLeastOnce);
    wait_replicas(&broker, 3);
    let avoid = broker.shard_of("dc-a");
    let publisher = connect_elsewhere(&broker, "dc-pub", avoid);
    leaving.disconnect();
    wait_replicas(&broker, 2);
    let expected = payloads("after", 60);
    for p in &expected {
        publisher.publish("dc", QoS::AtLeastOnce, false, p);
    }
    let got = collect(&mut members, expected.len());
    assert_once_each(&got, &expected, "the remaining members");
}

#[test]
fn an_offline_persistent_member_is_skipped_and_keeps_what_nobody_else_could_take() {
    let broker = Broker::start();
    let port = broker.port;
    // A persistent member: it stays in the group while offline.
    let mut options = Mqtt::options(port, "off-p");
    options.set_clean_session(false);
    let (mut persistent, _) = Mqtt::connect_with(options.clone());
    persistent.subscribe("$share/g/off", QoS::AtLeastOnce);
    let mut online = Mqtt::connect(port, "off-on");
    online.subscribe("$share/g/off", QoS::AtLeastOnce);
    wait_replicas(&broker, 2);
    persistent.disconnect();
    // Offline now: still a member, shown as not connected.
    let shared = wait_replicas_connected(&broker, 2, 1);
    let members = shared["groups"][0]["members"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        members
            .iter()
            .any(|m| m["client_id"] == "off-p" && m["connected"] == false),
        "{shared}"
    );
    let mut publisher = Mqtt::connect(port, "off-pub");
    let first = payloads("first", 20);
    // Each PUBACK awaited here: a PUBACK left unread would be taken by a
    // later `publish_acked` for its own, and the stage that reconnects the
    // persistent member would then start with its messages still unrouted.
    for p in &first {
        publisher.publish_acked("off", false, p);
    }
    let mut on = vec![Member::V4(online)];
    assert_once_each(
        &collect(&mut on, first.len()),
        &first,
        "the connected member",
    );
    // With no connected member left, QoS 1 waits in the persistent one.
    let Member::V4(online) = on.pop().expect("the member") else {
        unreachable!()
    };
    online.disconnect();
    wait_replicas_connected(&broker, 1, 0);
    let queued = payloads("queued", 5);
    for p in &queued {
        publisher.publish_acked("off", false, p);
    }
    let (back, connack) = Mqtt::connect_with(options);
    assert!(connack.session_present);
    let mut back = vec![Member::V4(back)];
    assert_once_each(
        &collect(&mut back, queued.len()),
        &queued,
        "the reconnected member",
    );
    // The membership came back with the session (wherever it reconnected):
    // connected again, it gets the next messages directly.
    wait_replicas_connected(&broker, 1, 1);
    let later = payloads("later", 5);
    for p in &later {
        publisher.publish_acked("off", false, p);
    }
    assert_once_each(
        &collect(&mut back, later.len()),
        &later,
        "the member, back online",
    );
}

#[test]
fn hash_clientid_gives_each_publishers_messages_to_one_member() {
    let broker = Broker::builder()
        .config("shared_subscription_strategy = \"hash_clientid\"\n")
        .start();
    let port = broker.port;
    let mut members = vec![
        Member::v4(port, "hc-a", "$share/g/hc"),
        Member::v5(port, "hc-b", "$share/g/hc"),
        Member::v4(port, "hc-c", "$share/g/hc"),
    ];
    wait_replicas(&broker, 3);
    let publishers: Vec<Mqtt> = (0..4)
        .map(|i| Mqtt::connect(port, &format!("hc-pub-{i}")))
        .collect();
    let mut expected = Vec::new();
    for (i, publisher) in publishers.iter().enumerate() {
        for p in payloads(&format!("p{i}"), 25) {
            publisher.publish("hc", QoS::AtLeastOnce, false, &p);
            expected.push(p);
        }
    }
    let got = collect(&mut members, expected.len());
    assert_once_each(&got, &expected, "the group");
    for i in 0..publishers.len() {
        let prefix = format!("p{i}-");
        let receivers: Vec<usize> = got
            .iter()
            .enumerate()
            .filter(|(_, ps)| ps.iter().any(|p| p.starts_with(prefix.as_bytes())))
            .map(|(m, _)| m)
            .collect();
        assert_eq!(
            receivers.len(),
            1,
            "publisher {i}'s messages went to {receivers:?}"
        );
    }
}

#[test]
fn retained_messages_are_not_sent_on_a_shared_subscribe() {
    let broker = Broker::start();
    let port = broker.port;
    let mut publisher = Mqtt::connect(port, "rt-pub");
    publisher.publish_acked("rt/t", true, b"kept");
    let mut members = vec![
        Member::v4(port, "rt-a", "$share/g/rt/t"),
        Member::v5(port, "rt-b", "$share/g2/rt/#"),
    ];
    // A plain subscriber gets the retained message: it is there.
    let mut plain = Mqtt::connect(port, "rt-plain");
    plain.subscribe("rt/t", QoS::AtLeastOnce);
    assert_eq!(&plain.expect_publish().payload[..], b"kept");
    wait_replicas(&broker, 2);
    publisher.publish_acked("rt/t", false, b"live");
    for member in &mut members {
        let first = member.recv(TIMEOUT).expect("the live message");
        assert_eq!(first, b"live", "the retained message came first");
    }
}

#[test]
fn unsubscribing_from_one_group_leaves_the_others() {
    let broker = Broker::start();
    let port = broker.port;
    let mut client = Mqtt::connect(port, "us-a");
    client.subscribe("$share/g1/us", QoS::AtLeastOnce);
    client.subscribe("$share/g2/us", QoS::AtLeastOnce);
    wait_replicas(&broker, 2);
    client.unsubscribe("$share/g1/us");
    let shared = wait_replicas(&broker, 1);
    assert_eq!(shared["groups"][0]["group"], "$share/g2/us", "{shared}");
    let mut publisher = Mqtt::connect(port, "us-pub");
    publisher.publish_acked("us", false, b"one");
    let mut members = vec![Member::V4(client)];
    let expected = vec![b"one".to_vec()];
    assert_once_each(&collect(&mut members, 1), &expected, "the g2 membership");
}

#[test]
fn malformed_share_names_are_refused_with_0x8f_in_v5_and_0x80_in_v3() {
    let broker = Broker::start();
    let bad = [
        "$share//t",
        "$share/g+/t",
        "$share/#/t",
        "$share/g",
        "$share/g/",
        "$share/g/a/#/b",
    ];
    let mut v5 = raw_v5(broker.port, "bad-v5");
    let mut v3 = Raw::connect(broker.port, "bad-v3");
    for (i, filter) in bad.iter().enumerate() {
        let id = i as u16 + 1;
        v5.send(&subscribe_v5(id, filter, 1));
        let [hi, lo] = id.to_be_bytes();
        assert_eq!(
            v5.expect_packet().bytes(),
            vec![0x90, 4, hi, lo, 0, 0x8f],
            "{filter}"
        );
        assert_eq!(v3.subscribe(id, &[(filter, 1)]), vec![0x80], "{filter}");
    }
    // Both stay connected, and a valid share is granted.
    v5.send(&subscribe_v5(99, "$share/g/t", 1));
    assert_eq!(v5.expect_packet().bytes(), vec![0x90, 4, 0, 99, 0, 1]);
    assert_eq!(v3.subscribe(99, &[("$share/g/t", 1)]), vec![1]);
}

#[test]
fn no_local_on_a_shared_subscription_is_disconnect_0x82() {
    let mut broker = Broker::start();
    let mut v5 = raw_v5(broker.port, "nl-v5");
    // Options: QoS 1 and No Local (bit 2).
    v5.send(&subscribe_v5(1, "$share/g/t", 0x05));
    assert_eq!(v5.expect_packet().bytes(), vec![0xe0, 1, 0x82]);
    v5.expect_closed();
    broker.assert_running();
}

#[test]
fn a_take_over_on_the_other_shard_moves_the_membership_with_the_session() {
    let broker = Broker::start();
    let port = broker.port;
    let (first, options) = persistent_member(&broker, "to-m", "$share/g/to");
    let home = broker.shard_of("to-m");
    // Connect again with the same client id until the new connection lands
    // on the other shard: each one takes the session over.
    let mut moved = None;
    let mut previous = Some(first);
    for n in 2..=40 {
        let (client, connack) = Mqtt::connect_with(options.clone());
        assert!(
            connack.session_present,
            "connection {n}: the session came along"
        );
        drop(previous.take());
        if broker.shards_of("to-m", n)[n - 1] != home {
            moved = Some(client);
            break;
        }
        previous = Some(client);
    }
    let client = moved.expect("40 connections all landed on one shard");
    // The membership is now the other shard's, connected.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let shared = wait_replicas_connected(&broker, 1, 1);
        let member = &shared["groups"][0]["members"][0];
        if member["client_id"] == "to-m" && member["shard"] != home as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "membership did not move: {shared}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let publisher = Mqtt::connect(port, "to-pub");
    let expected = payloads("moved", 10);
    for p in &expected {
        publisher.publish("to", QoS::AtLeastOnce, false, p);
    }
    let mut members = vec![Member::V4(client)];
    assert_once_each(
        &collect(&mut members, expected.len()),
        &expected,
        "the moved member",
    );
}

#[test]
fn a_member_the_acl_denies_a_topic_is_passed_over_for_one_that_may_read_it() {
    let mut acl = tempfile::NamedTempFile::new().expect("acl file");
    std::io::Write::write_all(
        &mut acl,
        b"topic readwrite #\ntopic deny secret/x\n\nuser admin\ntopic readwrite #\n",
    )
    .expect("write acl");
    let broker = Broker::builder()
        .config(&format!(
            "acl_file = {:?}\n",
            acl.path().display().to_string()
        ))
        .start();
    let port = broker.port;
    // An anonymous member (its "+/+" covers the denied secret/x: partly
    // covered) and admin (fully covered).
    let anonymous = Member::v4(port, "acl-anon", "$share/g/+/+");
    let mut options = Mqtt::options(port, "acl-admin");
    options.set_credentials("admin", "x");
    let (mut admin, _) = Mqtt::connect_with(options);
    admin.subscribe("$share/g/+/+", QoS::AtLeastOnce);
    wait_replicas(&broker, 2);
    let mut publisher = Mqtt::connect_with({
        let mut o = Mqtt::options(port, "acl-pub");
        o.set_credentials("admin", "x");
        o
    })
    .0;
    let secrets = payloads("secret", 6);
    let open = payloads("open", 6);
    for (s, o) in secrets.iter().zip(&open) {
        publisher.publish_acked("secret/x", false, s);
        publisher.publish_acked("a/b", false, o);
    }
    let mut members = vec![anonymous, Member::V4(admin)];
    let got = collect(&mut members, secrets.len() + open.len());
    let everything: Vec<Vec<u8>> = secrets.iter().chain(&open).cloned().collect();
    assert_once_each(&got, &everything, "the group");
    assert!(
        got[0].iter().all(|p| p.starts_with(b"open")),
        "the anonymous member got a denied message"
    );
}

/// The Subscription Identifiers and RETAIN flag of a received publish.
fn ids_and_retain(p: &Publish5) -> (Vec<usize>, bool) {
    let mut ids = p
        .properties
        .as_ref()
        .map(|props| props.subscription_identifiers.clone())
        .unwrap_or_default();
    ids.sort_unstable();
    (ids, p.retain)
}

#[test]
fn a_shared_copy_carries_its_members_subscription_identifier_and_retain_as_published() {
    const COUNT: usize = 20;
    let broker = Broker::start();
    // `a` on shard 0 (offered on the publishing shard), `b` on shard 1
    // (reached through the mesh); the publisher on shard 0.
    let mut a = v5_on(&broker, "sid-a", 0);
    let mut b = v5_on(&broker, "sid-b", 1);
    let mut share_a = Filter5::new("$share/g/sid/#", QoS5::AtLeastOnce);
    share_a.preserve_retain = true;
    a.subscribe_filter_with_id(share_a, 5);
    // `a` also has an overlapping non-shared subscription: a separate copy
    // with its own identifier, RETAIN cleared.
    a.subscribe_filter_with_id(Filter5::new("sid/+", QoS5::AtLeastOnce), 11);
    b.subscribe_filter_with_id(Filter5::new("$share/g/sid/#", QoS5::AtLeastOnce), 6);
    wait_replicas(&broker, 2);
    let publisher = connect_elsewhere(&broker, "sid-pub", 1);
    let expected = payloads("sid", COUNT);
    for p in &expected {
        publisher.publish("sid/t", QoS::AtLeastOnce, true, p);
    }
    let mut got_a: Vec<Publish5> = Vec::new();
    let mut got_b: Vec<Publish5> = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while got_a.len() + got_b.len() < 2 * COUNT {
        assert!(
            Instant::now() < deadline,
            "only {} + {} of {} copies arrived",
            got_a.len(),
            got_b.len(),
            2 * COUNT
        );
        got_a.extend(a.recv_publish(Duration::from_millis(5)));
        got_b.extend(b.recv_publish(Duration::from_millis(5)));
    }
    // A duplicate would have arrived by now with the rest.
    while let Some(p) = a.recv_publish(Duration::from_millis(200)) {
        got_a.push(p);
    }
    while let Some(p) = b.recv_publish(Duration::from_millis(200)) {
        got_b.push(p);
    }
    let mut plain = Vec::new();
    let mut shared = vec![Vec::new(), Vec::new()];
    for p in &got_a {
        match ids_and_retain(p) {
            (ids, false) if ids == [11] => plain.push(p.payload.to_vec()),
            (ids, true) if ids == [5] => shared[0].push(p.payload.to_vec()),
            other => panic!("member a: unexpected identifiers / RETAIN {other:?}"),
        }
    }
    for p in &got_b {
        assert_eq!(
            ids_and_retain(p),
            (vec![6], false),
            "member b: its identifier, RETAIN cleared (no Retain As Published)"
        );
        shared[1].push(p.payload.to_vec());
    }
    assert_once_each(&[plain], &expected, "a's non-shared subscription");
    assert!(
        shared.iter().all(|m| !m.is_empty()),
        "round robin: {:?}",
        shared.iter().map(Vec::len).collect::<Vec<_>>()
    );
    assert_once_each(&shared, &expected, "group g");
}

#[test]
fn the_subscriptions_api_lists_shared_members_of_both_shards_by_topic() {
    let broker = Broker::start();
    let mut members = connect_spread(&broker, "sl", 2, 40);
    for (member, _) in &mut members {
        member.subscribe("$share/g/sl/+", QoS::AtLeastOnce);
    }
    let mut plain = Mqtt::connect(broker.port, "sl-plain");
    plain.subscribe("sl/#", QoS::AtMostOnce);
    let mut other = Mqtt::connect(broker.port, "sl-other");
    other.subscribe("$share/h/elsewhere", QoS::AtMostOnce);
    wait_replicas(&broker, members.len() as u64 + 1);
    let listed = get_json(&broker, "/api/v1/subscriptions?topic=sl%2Fx");
    assert_eq!(listed["total"], members.len() as u64 + 1, "{listed}");
    let mut found: Vec<(String, String, Option<String>, u64)> = listed["subscriptions"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|s| {
            (
                s["client_id"].as_str().unwrap_or_default().to_string(),
                s["filter"].as_str().unwrap_or_default().to_string(),
                s["group"].as_str().map(String::from),
                s["shard"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect();
    found.sort();
    let mut expected: Vec<(String, String, Option<String>, u64)> = members
        .iter()
        .enumerate()
        .map(|(i, (_, shard))| {
            (
                format!("sl-{i}"),
                "$share/g/sl/+".to_string(),
                Some("g".to_string()),
                *shard as u64,
            )
        })
        .collect();
    expected.push((
        "sl-plain".into(),
        "sl/#".into(),
        None,
        broker.shard_of("sl-plain") as u64,
    ));
    expected.sort();
    assert_eq!(found, expected);
    let all = get_json(&broker, "/api/v1/subscriptions");
    assert_eq!(all["total"], members.len() as u64 + 2, "{all}");
}

#[test]
fn a_take_over_storm_loses_no_acknowledged_shared_message() {
    take_over_storm(2);
}

/// With three shards a take-over's `Leave` (from the old shard) and `Join`
/// (from the new one) reach the third shard on different channels, in
/// either order; the publisher is often on that third shard.
#[test]
fn a_take_over_storm_over_three_shards_loses_no_acknowledged_shared_message() {
    take_over_storm(3);
}

/// The group's only member, a persistent session, taken over again and
/// again by connections landing on any of `shards` shards while a
/// publisher sends 300 QoS 1 messages: each one acknowledged reaches it.
fn take_over_storm(shards: usize) {
    const MESSAGES: usize = 300;
    const MOST_TAKE_OVERS: usize = 200;
    let broker = Broker::builder().shards(shards).start();
    let port = broker.port;
    // The group's only member, persistent: each message has one place to
    // go, the session, wherever it is at the time.
    let (mut member, options) = persistent_member(&broker, "storm-m", "$share/g/storm");
    let publisher = std::thread::spawn(move || {
        let mut publisher = Mqtt::connect(port, "storm-pub");
        for i in 0..MESSAGES {
            publisher.publish_acked("storm", false, format!("storm-{i}").as_bytes());
        }
    });
    // Take the session over again and again while the messages flow; the
    // new connections land on either shard.
    let mut got = Vec::new();
    let mut take_overs = 0;
    while !publisher.is_finished() && take_overs < MOST_TAKE_OVERS {
        let (next, connack) = Mqtt::connect_with(options.clone());
        assert!(connack.session_present, "take-over {take_overs}");
        // The broker closes the old connection: what it received by then
        // (and acknowledged) is all it gets.
        got.extend(member.publishes_until_closed());
        member = next;
        take_overs += 1;
    }
    publisher.join().expect("the publisher");
    let shards: HashSet<usize> = broker
        .shards_of("storm-m", take_overs + 1)
        .into_iter()
        .collect();
    assert!(shards.len() >= 2, "the session moved between the shards");
    // Every PUBACKed message reaches the member at least once (QoS 1: a
    // redelivery after a take-over may repeat one).
    let expected: HashSet<Vec<u8>> = payloads("storm", MESSAGES).into_iter().collect();
    let mut seen: HashSet<Vec<u8>> = got.iter().map(|p| p.payload.to_vec()).collect();
    let deadline = Instant::now() + TIMEOUT;
    while !expected.is_subset(&seen) {
        assert!(
            Instant::now() < deadline,
            "after {take_overs} take-overs, {} of {MESSAGES} arrived; missing e.g. {:?}; {}",
            expected.intersection(&seen).count(),
            expected
                .difference(&seen)
                .take(3)
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect::<Vec<_>>(),
            get_json(&broker, "/api/v1/stats")["total"]
        );
        if let Some(p) = member.recv_publish(Duration::from_millis(50)) {
            seen.insert(p.payload.to_vec());
        }
    }
    let stats = get_json(&broker, "/api/v1/stats");
    assert_eq!(crate::admin::total(&stats, "shared_dropped"), 0, "{stats}");
}

#[test]
fn messages_on_their_way_to_a_member_taken_over_in_a_clean_start_go_to_another_member() {
    const MESSAGES: usize = 300;
    const MOST_TAKE_OVERS: usize = 100;
    let broker = Broker::builder().shards(3).start();
    let port = broker.port;
    let share = "$share/g/clean";
    // A steady member, and one taken over again and again in a clean
    // start (each new connection subscribes again).
    let mut steady = Member::v4(port, "clean-steady", share);
    let mut moving = Mqtt::connect(port, "clean-m");
    moving.subscribe(share, QoS::AtLeastOnce);
    wait_replicas(&broker, 2);
    let publisher = std::thread::spawn(move || {
        let mut publisher = Mqtt::connect(port, "clean-pub");
        for i in 0..MESSAGES {
            publisher.publish_acked("clean", false, format!("clean-{i}").as_bytes());
        }
    });
    let mut take_overs = 0;
    while !publisher.is_finished() && take_overs < MOST_TAKE_OVERS {
        let mut next = Mqtt::connect(port, "clean-m");
        moving.publishes_until_closed();
        next.subscribe(share, QoS::AtLeastOnce);
        moving = next;
        take_overs += 1;
        while steady.recv(Duration::from_millis(1)).is_some() {}
    }
    publisher.join().expect("the publisher");
    assert!(take_overs > 0, "no take-over happened while publishing");
    // Every message was given to a member (the figures are at most a
    // sweep old), and what was on its way between shards to an ended
    // session went to a member instead of being dropped.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let stats = get_json(&broker, "/api/v1/stats");
        let given = crate::admin::total(&stats, "shared_deliveries");
        let dropped = crate::admin::total(&stats, "shared_dropped");
        assert_eq!(dropped, 0, "after {take_overs} take-overs: {stats}");
        if given >= MESSAGES as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "{given} given: {stats}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_v5_members_unacknowledged_messages_go_to_another_member_when_its_session_ends() {
    const MESSAGES: usize = 40;
    let broker = Broker::start();
    let port = broker.port;
    let share = "$share/g/ends";
    // "slow" (rumqttc v5, Session Expiry 0) takes at most 5 in flight and
    // acknowledges none; the rest of its share waits in its pending queue.
    let mut slow = slow_member(port, "ends-slow", share, 5);
    // The other member, on the other shard: what it gets of slow's comes
    // over the mesh.
    let mut steady = connect_elsewhere(&broker, "ends-steady", broker.shard_of("ends-slow"));
    steady.subscribe(share, QoS::AtLeastOnce);
    wait_replicas(&broker, 2);
    let mut publisher = Mqtt::connect(port, "ends-pub");
    let expected = payloads("ends", MESSAGES);
    for p in &expected {
        publisher.publish_acked("ends", false, p);
    }
    for _ in 0..5 {
        slow.expect_publish();
    }
    // Its session ends with the connection: the 5 in flight and the 15
    // pending go to "steady" (§4.8.2), which then has each of the 40.
    slow.client.disconnect().expect("DISCONNECT");
    let mut members = [Member::V4(steady)];
    let got = collect(&mut members, MESSAGES);
    assert_once_each(&got, &expected, "the member that stayed");
    let stats = get_json(&broker, "/api/v1/stats");
    assert_eq!(crate::admin::total(&stats, "shared_dropped"), 0, "{stats}");
}

#[test]
fn a_member_that_unsubscribes_hands_its_unsent_messages_to_another_member() {
    const MESSAGES: usize = 40;
    const IN_FLIGHT: usize = 5;
    let broker = Broker::start();
    let port = broker.port;
    let share = "$share/g/leaves";
    // "slow" (rumqttc v5) takes at most 5 in flight and acknowledges none
    // until it has left; the rest of its share waits in its pending queue.
    let mut slow = slow_member(port, "leaves-slow", share, IN_FLIGHT);
    slow.subscribe("leaves/marker", QoS5::AtLeastOnce);
    // The other member, on the other shard: what it gets of slow's comes
    // over the mesh.
    let mut steady = connect_elsewhere(&broker, "leaves-steady", broker.shard_of("leaves-slow"));
    steady.subscribe(share, QoS::AtLeastOnce);
    wait_replicas(&broker, 2);
    let mut publisher = Mqtt::connect(port, "leaves-pub");
    let expected = payloads("leaves", MESSAGES);
    for p in &expected {
        publisher.publish_acked("leaves", false, p);
    }
    let in_flight: Vec<Publish5> = (0..IN_FLIGHT).map(|_| slow.expect_publish()).collect();
    // It leaves the group, which still has "steady": the 15 that wait
    // unsent go to "steady" (§4.8.2); the 5 in flight stay with "slow", as
    // a delivery once started is completed (MQTT-3.10.4-3).
    assert_eq!(slow.unsubscribe(share), vec![UnsubAckReason::Success]);
    let mut members = [Member::V4(steady)];
    let mut got = collect(&mut members, MESSAGES - IN_FLIGHT);
    got.push(in_flight.iter().map(|p| p.payload.to_vec()).collect());
    assert_once_each(
        &got,
        &expected,
        "the member that stayed and the one in flight",
    );
    // Once "slow" acknowledges its 5, nothing of the group is left for it:
    // the next message it gets is the one on its own subscription.
    for p in &in_flight {
        slow.client.ack(p).expect("ack");
    }
    publisher.publish_acked("leaves/marker", false, b"marker");
    let next = slow.expect_publish();
    assert_eq!(
        (&next.topic[..], &next.payload[..]),
        (&b"leaves/marker"[..], &b"marker"[..])
    );
    let stats = get_json(&broker, "/api/v1/stats");
    assert_eq!(crate::admin::total(&stats, "shared_dropped"), 0, "{stats}");
}

#[test]
fn the_last_member_that_unsubscribes_keeps_its_unsent_messages() {
    const MESSAGES: usize = 12;
    const IN_FLIGHT: usize = 4;
    let broker = Broker::start();
    let port = broker.port;
    let share = "$share/g/last";
    let mut slow = slow_member(port, "last-slow", share, IN_FLIGHT);
    wait_replicas(&broker, 1);
    let mut publisher = Mqtt::connect(port, "last-pub");
    let expected = payloads("last", MESSAGES);
    for p in &expected {
        publisher.publish_acked("last", false, p);
    }
    // A PUBACK says the broker took the message, not that it reached
    // "slow": the publisher's shard sends it over the mesh after the
    // PUBACK. One still on its way when "slow"'s UNSUBSCRIBE is read there
    // is a new message for a group with no member (MQTT-3.10.4-2), dropped
    // and counted. So "slow" leaves once all 12 are its own, 4 in flight
    // and 8 in its pending queue (the figures are at most a sweep old).
    wait_stats(&broker, |s| {
        crate::admin::total(s, "shared_deliveries") == MESSAGES as u64
    });
    let mut got: Vec<Publish5> = (0..IN_FLIGHT).map(|_| slow.expect_publish()).collect();
    // No member is left to take the 8 that wait: they stay with "slow",
    // which may still be sent what it has buffered (MQTT-3.10.4-2).
    assert_eq!(slow.unsubscribe(share), vec![UnsubAckReason::Success]);
    for p in &got {
        slow.client.ack(p).expect("ack");
    }
    while got.len() < MESSAGES {
        let p = slow.expect_publish();
        slow.client.ack(&p).expect("ack");
        got.push(p);
    }
    let payloads: Vec<Vec<u8>> = got.iter().map(|p| p.payload.to_vec()).collect();
    assert_eq!(payloads, expected, "every one, in order");
    let stats = get_json(&broker, "/api/v1/stats");
    assert_eq!(crate::admin::total(&stats, "shared_dropped"), 0, "{stats}");
}
