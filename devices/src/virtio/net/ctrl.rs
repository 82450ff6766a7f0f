//! The control queue (virtio 1.2, 5.1.6.5), apart from any thread. A command is
//! `{class, command}` plus command data in device-readable buffers, then a 1-byte ack
//! in a device-writable one. Supported: VIRTIO_NET_CTRL_RX PROMISC / ALLMULTI (the TAP
//! delivers every frame anyway, so they only log), VIRTIO_NET_CTRL_MAC TABLE_SET
//! (validated, then accepted for the same reason) and VIRTIO_NET_CTRL_MQ VQ_PAIRS_SET.
//! Everything else answers VIRTIO_NET_ERR; a chain without a writable ack byte is
//! returned with length 0.

use virtio_bindings::bindings::virtio_net::*;
use virtio_queue::Queue;
use vm_memory::GuestMemory;

use super::io as net_io;
use super::pairs::Pairs;
use super::stats::{DropReason, NetStats};
use crate::virtio::iov::Buffers;
use crate::virtio::ring::{self, RingError, Step};

/// What the control commands may use.
pub struct CtrlCtx<'a> {
    /// VIRTIO_NET_F_CTRL_RX negotiated (RX class and MAC TABLE_SET).
    pub ctrl_rx: bool,
    /// VIRTIO_NET_F_MQ negotiated (MQ class).
    pub mq: bool,
    pub pairs: &'a Pairs,
}

/// What one [`process_ctrl`] call did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CtrlResult {
    /// Chains returned to the used ring.
    pub completed: usize,
    /// The driver must be interrupted for the control queue.
    pub notify: bool,
    /// The budget ran out with commands possibly left: call again.
    pub more: bool,
}

/// Answers up to `budget` available commands of `queue`.
pub fn process_ctrl<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    ctx: &CtrlCtx<'_>,
    stats: &NetStats,
    budget: usize,
) -> Result<CtrlResult, RingError> {
    let mut out = CtrlResult::default();
    out.more = ring::serve_batch(queue, mem, budget, |queue| {
        let Some(chain) = ring::pop_chain(queue, mem)? else {
            return Ok(Step::Empty);
        };
        let head = chain.head_index();
        let len = match net_io::split(chain, mem) {
            Ok(s) => answer(&s.readable, &s.writable, mem, ctx, stats, head),
            Err(e) => {
                stats.dropped(DropReason::CtrlError, &format_args!("chain {head}: {e}"));
                0
            }
        };
        ring::add_used(queue, mem, head, len)?;
        out.completed += 1;
        Ok(Step::Next)
    })?;
    out.notify = out.completed > 0 && ring::needs_notification(queue, mem)?;
    Ok(out)
}

/// Runs one command and writes its ack; returns the used length (0 without an ack).
fn answer<M: GuestMemory>(
    command: &Buffers,
    ack: &Buffers,
    mem: &M,
    ctx: &CtrlCtx<'_>,
    stats: &NetStats,
    head: u16,
) -> u32 {
    if ack.is_empty() {
        stats.dropped(
            DropReason::CtrlError,
            &format_args!("chain {head}: no ack byte"),
        );
        return 0;
    }
    let status = match execute(command, mem, ctx) {
        Ok(()) => VIRTIO_NET_OK,
        Err(why) => {
            stats.dropped(DropReason::CtrlError, &format_args!("chain {head}: {why}"));
            VIRTIO_NET_ERR
        }
    };
    match ack.write_start(mem, &[status as u8]) {
        Ok(1) => 1,
        _ => {
            stats.dropped(
                DropReason::CtrlError,
                &format_args!("chain {head}: cannot write the ack"),
            );
            0
        }
    }
}

/// Checks and applies one command.
fn execute<M: GuestMemory>(cmd: &Buffers, mem: &M, ctx: &CtrlCtx<'_>) -> Result<(), String> {
    let mut hdr = [0u8; 2];
    if cmd.len() < 2 {
        return Err("command header missing".into());
    }
    cmd.read_at(mem, 0, &mut hdr)
        .map_err(|_| "cannot read the command".to_string())?;
    let (class, command) = (u32::from(hdr[0]), u32::from(hdr[1]));
    let data_len = cmd.len() - 2;
    match (class, command) {
        (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC | VIRTIO_NET_CTRL_RX_ALLMULTI)
            if ctx.ctrl_rx =>
        {
            let on = read_data::<1, _>(cmd, mem)?[0];
            let what = if command == VIRTIO_NET_CTRL_RX_PROMISC {
                "promiscuous"
            } else {
                "all-multicast"
            };
            tracing::info!(
                "virtio-net: guest turns {what} mode {} (the TAP delivers every frame)",
                if on != 0 { "on" } else { "off" }
            );
            Ok(())
        }
        (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET) if ctx.ctrl_rx => {
            let (unicast, multicast) = mac_tables(cmd, mem)?;
            tracing::debug!(
                "virtio-net: MAC filter of {unicast} unicast and {multicast} multicast \
                 address(es) (not applied: the TAP delivers every frame)"
            );
            Ok(())
        }
        (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) if ctx.mq => {
            let n = u16::from_le_bytes(read_data::<2, _>(cmd, mem)?);
            if n == 0 || n > ctx.pairs.max() {
                return Err(format!("VQ_PAIRS_SET {n} outside 1..={}", ctx.pairs.max()));
            }
            ctx.pairs
                .set_active(n)
                .map_err(|e| format!("VQ_PAIRS_SET {n}: {e}"))?;
            tracing::debug!("virtio-net: {n} queue pair(s) in use");
            Ok(())
        }
        _ => Err(format!(
            "unsupported or not negotiated command {class}/{command} ({data_len} data bytes)"
        )),
    }
}

/// The command data, which must be exactly `N` bytes.
fn read_data<const N: usize, M: GuestMemory>(cmd: &Buffers, mem: &M) -> Result<[u8; N], String> {
    let data_len = cmd.len() - 2;
    if data_len != N as u64 {
        return Err(format!("{data_len} data bytes instead of {N}"));
    }
    let mut data = [0u8; N];
    cmd.read_at(mem, 2, &mut data)
        .map_err(|_| "cannot read the command data".to_string())?;
    Ok(data)
}

/// Checks the two `{le32 entries; u8 macs[entries][6]}` tables of MAC TABLE_SET, which
/// must fill the data exactly; returns the entry counts.
fn mac_tables<M: GuestMemory>(cmd: &Buffers, mem: &M) -> Result<(u32, u32), String> {
    let mut at = 2u64;
    let mut counts = [0u32; 2];
    for count in &mut counts {
        let mut entries = [0u8; 4];
        if cmd.len() < at + 4 {
            return Err("MAC table truncated".into());
        }
        cmd.read_at(mem, at, &mut entries)
            .map_err(|_| "cannot read a MAC table".to_string())?;
        *count = u32::from_le_bytes(entries);
        at += 4 + u64::from(*count) * 6;
        if at > cmd.len() {
            return Err(format!("MAC table of {count} entries truncated"));
        }
    }
    if at != cmd.len() {
        return Err(format!("{} bytes after the MAC tables", cmd.len() - at));
    }
    Ok((counts[0], counts[1]))
}
