//! Intel MultiProcessor Specification 1.4 table.
//!
//! Linux ignores the MADT's IOAPIC when booted with `acpi=noirq` (which the guest
//! kernel for PVM hosts needs) and then falls back to this table to find the IOAPIC
//! and the ISA interrupt routing. Without it the guest runs in 8259 PIC mode.
//! Processors are described by the MADT; they are listed here too for kernels that
//! boot without ACPI.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{ACPI_START, EBDA_START, IOAPIC_START, LAPIC_START};

/// Where the floating pointer goes: the first KiB of the EBDA, one of the places
/// Linux scans. The configuration table follows it.
pub const MPTABLE_START: u64 = EBDA_START;
/// Everything from the EBDA to 1 MiB is reserved in the e820 map (and backed by RAM):
/// the configuration table may grow up to the ACPI tables.
const MPTABLE_LIMIT: u64 = ACPI_START;

const MPC_SPEC: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const ISA_BUS_ID: u8 = 0;
/// Legacy ISA IRQs routed through the IOAPIC.
const ISA_IRQS: u8 = 16;

/// Errors of MP table construction.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit in the MP table")]
    TooManyCpus(u8),
    #[error("writing the MP table to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The configuration table entries (after the 44-byte header) and their count.
fn entries(cpus: u8) -> (Vec<u8>, u16) {
    let mut e = Vec::new();
    let mut count = 0u16;
    for id in 0..cpus {
        e.push(0); // processor
        e.push(id);
        e.push(APIC_VERSION);
        e.push(1 | if id == 0 { 2 } else { 0 }); // enabled, BSP
        e.extend(0x600u32.to_le_bytes()); // family 6 signature
        e.extend(0x201u32.to_le_bytes()); // FPU, APIC
        e.extend([0u8; 8]);
        count += 1;
    }
    e.extend([1, ISA_BUS_ID]); // bus
    e.extend(*b"ISA   ");
    count += 1;
    let ioapic_id = cpus;
    e.extend([2, ioapic_id, IOAPIC_VERSION, 1]); // IOAPIC, enabled
    e.extend((IOAPIC_START as u32).to_le_bytes());
    count += 1;
    // I/O interrupts: the 8259 cascade on pin 0, ISA IRQ n on pin n, except the PIT's
    // IRQ 0, which KVM's default routing delivers on pin 2.
    let mut io_irq = |kind: u8, src: u8, pin: u8| {
        e.extend([3, kind, 0, 0, ISA_BUS_ID, src, ioapic_id, pin]);
        count += 1;
    };
    io_irq(3, 0, 0); // ExtINT
    for irq in 0..ISA_IRQS {
        match irq {
            0 => io_irq(0, 0, 2),
            2 => {}
            n => io_irq(0, n, n),
        }
    }
    // Local interrupts: LINT0 ExtINT, LINT1 NMI, on every local APIC.
    e.extend([4, 3, 0, 0, ISA_BUS_ID, 0, 0xff, 0]);
    e.extend([4, 1, 0, 0, ISA_BUS_ID, 0, 0xff, 1]);
    count += 2;
    (e, count)
}

/// Writes the floating pointer and configuration table for `cpus` processors.
pub fn setup_mptable<M: GuestMemoryBackend>(mem: &M, cpus: u8) -> Result<(), MptableError> {
    let (body, count) = entries(cpus);
    let table_addr = MPTABLE_START + 16;
    let len = 44 + body.len();
    if table_addr + len as u64 > MPTABLE_LIMIT || cpus == u8::MAX {
        return Err(MptableError::TooManyCpus(cpus));
    }
    let mut table = Vec::with_capacity(len);
    table.extend(*b"PCMP");
    table.extend((len as u16).to_le_bytes());
    table.push(MPC_SPEC);
    table.push(0); // checksum, below
    table.extend(*b"FERRIO  ");
    table.extend(*b"FERRIO VM   ");
    table.extend(0u32.to_le_bytes()); // OEM table pointer
    table.extend(0u16.to_le_bytes()); // OEM table size
    table.extend(count.to_le_bytes());
    table.extend((LAPIC_START as u32).to_le_bytes());
    table.extend([0u8; 4]); // extended table length, checksum, reserved
    table.extend(body);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend(*b"_MP_");
    fp.extend((table_addr as u32).to_le_bytes());
    fp.extend([1, MPC_SPEC, 0, 0, 0, 0, 0, 0]); // length 1 (16 bytes), checksum below
    fp[10] = checksum(&fp);

    mem.write_slice(&fp, GuestAddress(MPTABLE_START))?;
    mem.write_slice(&table, GuestAddress(table_addr))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_have_valid_checksums_and_entries() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        setup_mptable(&mem, 4).unwrap();
        let mut fp = [0u8; 16];
        mem.read_slice(&mut fp, GuestAddress(MPTABLE_START))
            .unwrap();
        assert_eq!(&fp[..4], b"_MP_");
        assert_eq!(sum(&fp), 0);
        let table_addr = u32::from_le_bytes(fp[4..8].try_into().unwrap()) as u64;
        let mut hdr = [0u8; 44];
        mem.read_slice(&mut hdr, GuestAddress(table_addr)).unwrap();
        assert_eq!(&hdr[..4], b"PCMP");
        let len = u16::from_le_bytes([hdr[4], hdr[5]]) as usize;
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(table_addr))
            .unwrap();
        assert_eq!(sum(&table), 0);
        // Walk the entries: 4 processors (only the first is the BSP), one IOAPIC
        // with id 4, IRQ 4 routed to pin 4 and IRQ 0 to pin 2.
        let (mut at, mut cpus, mut bsp, mut routes) = (44, 0, 0, Vec::new());
        let count = u16::from_le_bytes([table[34], table[35]]);
        for _ in 0..count {
            match table[at] {
                0 => {
                    cpus += 1;
                    bsp += usize::from(table[at + 3] & 2 != 0);
                    at += 20;
                }
                2 => {
                    assert_eq!(table[at + 1], 4);
                    at += 8;
                }
                3 => {
                    routes.push((table[at + 1], table[at + 5], table[at + 7]));
                    at += 8;
                }
                _ => at += 8,
            }
        }
        assert_eq!(at, len);
        assert_eq!((cpus, bsp), (4, 1));
        assert!(routes.contains(&(0, 4, 4)));
        assert!(routes.contains(&(0, 0, 2)));
        assert!(routes.contains(&(3, 0, 0)));
        assert!(!routes.iter().any(|r| r.0 == 0 && r.1 == 2));
    }

    #[test]
    fn fits_the_ebda_for_the_largest_vm() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        setup_mptable(&mem, crate::config::MAX_VCPUS).unwrap();
        assert!(matches!(
            setup_mptable(&mem, u8::MAX),
            Err(MptableError::TooManyCpus(_))
        ));
    }
}
