//! Does a broker hand a SIGKILLed consumer's partitions to the group's survivor?
//!
//! A reproduction without sluice: two member processes join one consumer
//! group on a topic of 8 partitions (librdkafka with the settings sluice's
//! workers use: manual commits every second, `session.timeout.ms` 6000,
//! `heartbeat.interval.ms` 500), one is killed with SIGKILL, and a producer
//! writes one message a partition every 250 ms. It reports when the survivor's
//! assignment changed and, for each partition, how long after the kill its
//! first message was read (or that it was never read within the watch time).
//!
//! ```text
//! cargo run --example kafka_group_takeover -- [BROKERS] [RUNS] [WATCH_SECS]
//! ```
//! Defaults: `127.0.0.1:9092`, 3 runs, 40 s. Every run uses a fresh topic and group.
//! The process exits 1 if, in any run, a partition was still unread at the end.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientContext, TopicPartitionList};

const PARTITIONS: i32 = 8;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("member") {
        return member(&args[1], &args[2], &args[3]);
    }
    let brokers = args.first().map_or("127.0.0.1:9092", String::as_str);
    let runs: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(3);
    let watch = Duration::from_secs(args.get(2).and_then(|a| a.parse().ok()).unwrap_or(40));
    let mut healed = 0;
    for run in 1..=runs {
        println!("run {run}:");
        healed += usize::from(one_run(brokers, watch));
    }
    println!("{healed} of {runs} runs: every partition read again after the kill");
    if healed < runs {
        std::process::exit(1);
    }
}

/// Events from a member process, as it prints them.
enum Event {
    Assigned(String, BTreeSet<i32>),
    Read(String, i32),
}

fn one_run(brokers: &str, watch: Duration) -> bool {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (topic, group) = (format!("takeover-{id}"), format!("takeover-{id}"));
    create_topic(brokers, &topic);
    let (events, received) = mpsc::channel();
    let mut survivor = spawn_member(brokers, &topic, &group, "survivor", events.clone());
    let mut victim = spawn_member(brokers, &topic, &group, "victim", events);
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "1")
        .create()
        .expect("a producer");

    // Both members hold partitions, and every partition is read.
    let mut assignments: BTreeMap<String, BTreeSet<i32>> = BTreeMap::new();
    let settle = Instant::now() + Duration::from_secs(60);
    let mut read: BTreeSet<i32> = BTreeSet::new();
    while Instant::now() < settle && !(assignments.len() == 2 && read.len() == PARTITIONS as usize)
    {
        produce_round(&producer, &topic);
        drain(&received, Duration::from_millis(250), |event| match event {
            Event::Assigned(who, parts) => {
                assignments.insert(who, parts);
            }
            Event::Read(_, partition) => {
                read.insert(partition);
            }
        });
    }
    println!("  before the kill: {assignments:?}");
    if read.len() < PARTITIONS as usize {
        println!("  the group never settled; skipping this run");
        kill(&mut survivor);
        kill(&mut victim);
        return false;
    }

    kill(&mut victim);
    let killed = Instant::now();
    let mut first_read: BTreeMap<i32, Duration> = BTreeMap::new();
    while killed.elapsed() < watch && first_read.len() < PARTITIONS as usize {
        produce_round(&producer, &topic);
        drain(&received, Duration::from_millis(250), |event| match event {
            Event::Assigned(who, parts) if who == "survivor" => {
                println!(
                    "  {:>6.2} s: survivor assigned {parts:?}",
                    killed.elapsed().as_secs_f64()
                );
            }
            Event::Read(who, partition) if who == "survivor" => {
                first_read.entry(partition).or_insert(killed.elapsed());
            }
            _ => {}
        });
    }
    kill(&mut survivor);
    let unread: Vec<i32> = (0..PARTITIONS)
        .filter(|p| !first_read.contains_key(p))
        .collect();
    let latest = first_read.values().max().copied().unwrap_or_default();
    if unread.is_empty() {
        println!(
            "  every partition read again {:.2} s after the kill",
            latest.as_secs_f64()
        );
    } else {
        println!(
            "  partitions {unread:?} still unread {:.0} s after the kill",
            watch.as_secs_f64()
        );
    }
    unread.is_empty()
}

fn create_topic(brokers: &str, topic: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("an admin client");
    let new = NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1));
    let created = futures::executor::block_on(admin.create_topics([&new], &AdminOptions::new()))
        .expect("CreateTopics answered");
    for result in created {
        result.expect("the topic is created");
    }
}

fn produce_round(producer: &BaseProducer, topic: &str) {
    for partition in 0..PARTITIONS {
        let record = BaseRecord::<(), _>::to(topic)
            .partition(partition)
            .payload("x");
        if let Err((err, _)) = producer.send(record) {
            eprintln!("produce to partition {partition}: {err}");
        }
    }
    let _ = producer.flush(Duration::from_secs(5));
}

fn drain(received: &mpsc::Receiver<Event>, period: Duration, mut on: impl FnMut(Event)) {
    let until = Instant::now() + period;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        match received.recv_timeout(left) {
            Ok(event) => on(event),
            Err(_) => return,
        }
    }
}

fn spawn_member(
    brokers: &str,
    topic: &str,
    group: &str,
    name: &str,
    events: mpsc::Sender<Event>,
) -> Child {
    let mut child = Command::new(std::env::current_exe().expect("this program's path"))
        .args(["member", brokers, topic, group])
        .stdout(Stdio::piped())
        .spawn()
        .expect("a member process");
    let stdout = child.stdout.take().expect("piped stdout");
    let name = name.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let event = match line.split_once(' ') {
                Some(("assigned", list)) => Event::Assigned(
                    name.clone(),
                    list.split(',').filter_map(|p| p.parse().ok()).collect(),
                ),
                Some(("read", partition)) => match partition.parse() {
                    Ok(partition) => Event::Read(name.clone(), partition),
                    Err(_) => continue,
                },
                _ => continue,
            };
            if events.send(event).is_err() {
                return;
            }
        }
    });
    child
}

fn kill(child: &mut Child) {
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
}

/// Prints the assignment after every rebalance, and commits before a revoke (as sluice's workers do).
struct Printing;

impl ClientContext for Printing {}

impl ConsumerContext for Printing {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if matches!(rebalance, Rebalance::Revoke(_)) {
            let _ = consumer.commit_consumer_state(CommitMode::Sync);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, _: &Rebalance<'_>) {
        let assigned = consumer
            .assignment()
            .map(|list| partitions_of(&list))
            .unwrap_or_default();
        println!("assigned {assigned}");
    }
}

fn partitions_of(list: &TopicPartitionList) -> String {
    let parts: Vec<String> = list
        .elements()
        .iter()
        .map(|e| e.partition().to_string())
        .collect();
    parts.join(",")
}

/// A group member: reads and commits, printing what it is assigned and each partition it reads.
fn member(brokers: &str, topic: &str, group: &str) {
    let consumer: BaseConsumer<Printing> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .set("fetch.wait.max.ms", "5")
        .create_with_context(Printing)
        .expect("a consumer");
    consumer.subscribe(&[topic]).expect("subscribed");
    let mut last_commit = Instant::now();
    loop {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            println!("read {}", message.partition());
        }
        if last_commit.elapsed() > Duration::from_secs(1) {
            let _ = consumer.commit_consumer_state(CommitMode::Async);
            last_commit = Instant::now();
        }
    }
}
