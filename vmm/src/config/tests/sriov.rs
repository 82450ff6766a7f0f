//! SR-IOV in the configuration: `id=`/`vf_of=` on disks and NICs, the rules
//! `validate` enforces, the PF -> VFs helpers and config files with VFs.

use super::*;

/// A layer with these `--disk` and `--net` specs.
fn devices(disks: &[&str], nets: &[&str]) -> FileConfig {
    let specs = |v: &[&str]| (!v.is_empty()).then(|| v.iter().map(|s| s.to_string()).collect());
    FileConfig {
        disk: specs(disks),
        net: specs(nets),
        ..Default::default()
    }
}

/// Validates `layer` (with `--iommu` when `iommu`) and returns the config.
fn valid(dir: &tempfile::TempDir, layer: FileConfig, iommu: bool) -> VmConfig {
    let iommu = FileConfig {
        iommu: iommu.then_some(true),
        ..Default::default()
    };
    builder(dir)
        .apply(layer)
        .apply(iommu)
        .validate(&HOST)
        .expect("valid")
}

/// The error message for `disks` and `nets` (with `--iommu`, so `iommu=on` alone
/// never fails).
fn message(disks: &[&str], nets: &[&str]) -> String {
    let dir = files();
    let mut layer = devices(disks, nets);
    layer.iommu = Some(true);
    let err = err_with(&dir, layer);
    assert!(matches!(err, ConfigError::BadDevice { .. }), "{err}");
    err.to_string()
}

/// Writes a 1 MiB image `name` into `dir`; returns its path as a string.
fn image(dir: &tempfile::TempDir, name: &str) -> String {
    let path = dir.path().join(name);
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(1 << 20))
        .expect("image");
    path.display().to_string()
}

fn taps(nets: &[&NetConfig]) -> Vec<String> {
    nets.iter()
        .map(|n| match &n.backend {
            NetBackendConfig::Tap(name) => name.clone(),
            NetBackendConfig::Fd(fd) => format!("fd{fd}"),
        })
        .collect()
}

#[test]
fn net_pf_with_vfs() {
    let dir = files();
    let cfg = valid(
        &dir,
        devices(
            &[],
            &[
                "id=pf0,tap=tpf0,slot=4,iommu=on",
                "tap=tvf0,vf_of=pf0,mac=02:00:00:00:00:10,num_queue_pairs=2,queue_size=512,iommu=on",
                "tap=tvf1,vf_of=pf0",
                "fd=9,vf_of=pf0,id=vf2",
            ],
        ),
        true,
    );
    assert_eq!(cfg.nets.len(), 4, "VFs stay in `nets`");
    let pf = &cfg.nets[0];
    assert_eq!((pf.id.as_deref(), pf.vf_of.as_deref()), (Some("pf0"), None));
    assert!(!pf.is_vf());
    assert_eq!(pf.slot, Some(4));
    let vfs = cfg.net_vfs(pf);
    assert_eq!(taps(&vfs), ["tvf0", "tvf1", "fd9"]);
    assert!(vfs
        .iter()
        .all(|v| v.is_vf() && v.vf_of.as_deref() == Some("pf0")));
    assert_eq!(vfs[2].id.as_deref(), Some("vf2"));
    let vf0 = vfs[0];
    assert_eq!(vf0.mac, MacAddr([2, 0, 0, 0, 0, 0x10]));
    assert_eq!(
        (vf0.num_queue_pairs, vf0.queue_size, vf0.iommu),
        (2, 512, true)
    );
    assert_eq!((vf0.slot, vf0.id.as_ref()), (None, None));
    // The default MAC counts every --net, VFs included.
    assert_eq!(vfs[1].mac.to_string(), "52:54:00:12:34:58");
    assert_eq!(vfs[2].mac.to_string(), "52:54:00:12:34:59");
    assert!(cfg.net_vfs(vfs[0]).is_empty(), "a VF without id has no VFs");
    assert!(cfg.net_vfs(vfs[2]).is_empty(), "a VF with an id has no VFs");
}

#[test]
fn disk_pf_with_vfs() {
    let dir = files();
    let (pf, vf0, vf1) = (
        image(&dir, "pf.img"),
        image(&dir, "vf0.img"),
        image(&dir, "vf1.img"),
    );
    let specs = [
        format!("id=d0,path={pf},slot=2"),
        format!(
            "path={vf0},vf_of=d0,readonly=on,direct=on,num_queues=4,queue_size=128,\
             serial=vf-0,io_engine=uring"
        ),
        format!("vf_of=d0,path={vf1}"),
    ];
    let specs: Vec<&str> = specs.iter().map(String::as_str).collect();
    let cfg = valid(&dir, devices(&specs, &[]), false);
    assert_eq!(cfg.disks.len(), 3, "VFs stay in `disks`");
    let vfs = cfg.disk_vfs(&cfg.disks[0]);
    let paths: Vec<_> = vfs.iter().map(|d| d.path.display().to_string()).collect();
    assert_eq!(paths, [vf0, vf1]);
    assert_eq!(cfg.disks[0].id.as_deref(), Some("d0"));
    assert!(!cfg.disks[0].is_vf() && vfs.iter().all(|d| d.is_vf()));
    let d = vfs[0];
    assert_eq!(
        (d.read_only, d.direct, d.num_queues, d.queue_size),
        (true, true, 4, 128)
    );
    assert_eq!(d.serial.as_deref(), Some("vf-0"));
    assert_eq!(d.io_engine, ferrio_devices::virtio::block::IoEngine::Uring);
    assert_eq!((d.slot, d.iommu), (None, false));
}

#[test]
fn vfs_of_each_pf_in_declaration_order() {
    let dir = files();
    let cfg = valid(
        &dir,
        devices(
            &[],
            &[
                "tap=v_b0,vf_of=b",
                "tap=a_pf,id=a",
                "tap=v_a0,vf_of=a",
                "tap=b_pf,id=b",
                "tap=v_b1,vf_of=b",
                "tap=v_a1,vf_of=a",
                "tap=lone,id=lone",
                "tap=anon",
            ],
        ),
        false,
    );
    let by_tap = |t: &str| {
        cfg.nets
            .iter()
            .find(|n| n.backend == NetBackendConfig::Tap(t.into()))
            .expect(t)
    };
    assert_eq!(taps(&cfg.net_vfs(by_tap("a_pf"))), ["v_a0", "v_a1"]);
    assert_eq!(taps(&cfg.net_vfs(by_tap("b_pf"))), ["v_b0", "v_b1"]);
    assert!(cfg.net_vfs(by_tap("lone")).is_empty(), "id, no VFs");
    assert!(cfg.net_vfs(by_tap("anon")).is_empty(), "no id");
    // A PF of one type has no VFs of the other, even with the same id string.
    assert!(cfg
        .disk_vfs(&parse_disk("path=/x,id=a").unwrap())
        .is_empty());
    let all: Vec<_> = cfg.nets.iter().map(|n| n.is_vf()).collect();
    assert_eq!(all, [true, false, true, false, true, true, false, false]);
}

#[test]
fn no_sriov_means_no_ids() {
    let dir = files();
    let disk = format!("path={}", image(&dir, "a.img"));
    let cfg = valid(&dir, devices(&[&disk], &["tap=t"]), false);
    assert_eq!(
        (cfg.disks[0].id.as_ref(), cfg.disks[0].vf_of.as_ref()),
        (None, None)
    );
    assert_eq!(
        (cfg.nets[0].id.as_ref(), cfg.nets[0].vf_of.as_ref()),
        (None, None)
    );
    assert!(cfg.disk_vfs(&cfg.disks[0]).is_empty() && cfg.net_vfs(&cfg.nets[0]).is_empty());
}

#[test]
fn bad_ids() {
    let why = "must be 1..=32 characters of A-Z, a-z, 0-9, _ and -";
    for (spec, key) in [
        ("tap=t,id=", "id"),
        ("tap=t,id=a.b", "id"),
        ("tap=t,id=a b", "id"),
        ("tap=t,id=é", "id"),
        ("tap=t,vf_of=", "vf_of"),
        ("tap=t,vf_of=pf/0", "vf_of"),
    ] {
        assert_eq!(
            message(&[], &[spec]),
            format!("invalid device spec '{spec}': {key} {why}")
        );
    }
    let long = format!("path=/x,id={}", "a".repeat(33));
    assert_eq!(
        message(&[&long], &[]),
        format!("invalid device spec '{long}': id {why}")
    );
    let dir = files();
    let ok = format!("tap=t,id={}", "aZ09_-".repeat(5) + "xy");
    let cfg = valid(&dir, devices(&[], &[&ok]), false);
    assert_eq!(cfg.nets[0].id.as_ref().map(String::len), Some(32));
}

#[test]
fn duplicate_ids() {
    let why = "(ids must be unique across all disks and net devices)";
    assert_eq!(
        message(&[], &["tap=a,id=x", "tap=b,id=x"]),
        format!("invalid device spec 'tap=b,id=x': duplicate id `x` {why}")
    );
    // Disks and NICs share one namespace; the later device is named.
    assert_eq!(
        message(&["path=/x,id=pf0"], &["tap=a,id=pf0"]),
        format!("invalid device spec 'tap=a,id=pf0': duplicate id `pf0` {why}")
    );
    assert_eq!(
        message(
            &["path=/x,id=d", "path=/y,id=d,vf_of=e", "path=/z,id=e"],
            &[]
        ),
        format!("invalid device spec 'path=/y,id=d,vf_of=e': duplicate id `d` {why}")
    );
}

#[test]
fn unknown_pf() {
    assert_eq!(
        message(&[], &["tap=a,id=pf0", "tap=b,vf_of=pf1"]),
        "invalid device spec 'tap=b,vf_of=pf1': unknown PF id `pf1`"
    );
    assert_eq!(
        message(&["path=/x,vf_of=d0"], &[]),
        "invalid device spec 'path=/x,vf_of=d0': unknown PF id `d0`"
    );
    assert_eq!(
        message(&[], &["tap=a,id=me,vf_of=me"]),
        "invalid device spec 'tap=a,id=me,vf_of=me': a device cannot be a VF of itself"
    );
}

#[test]
fn vf_of_other_device_type() {
    assert_eq!(
        message(&["path=/x,vf_of=n0"], &["tap=a,id=n0"]),
        "invalid device spec 'path=/x,vf_of=n0': PF `n0` is a net device, but this VF is a \
         disk (a VF has its PF's device type)"
    );
    assert_eq!(
        message(&["path=/x,id=d0"], &["tap=a,vf_of=d0"]),
        "invalid device spec 'tap=a,vf_of=d0': PF `d0` is a disk, but this VF is a net \
         device (a VF has its PF's device type)"
    );
}

#[test]
fn vf_of_a_vf() {
    assert_eq!(
        message(
            &[],
            &["tap=a,id=pf", "tap=b,id=vf,vf_of=pf", "tap=c,vf_of=vf"]
        ),
        "invalid device spec 'tap=c,vf_of=vf': PF `vf` is itself a VF (of `pf`); a VF cannot \
         have VFs"
    );
    assert_eq!(
        message(
            &["path=/y,vf_of=v", "path=/x,id=v,vf_of=p", "path=/z,id=p"],
            &[]
        ),
        "invalid device spec 'path=/y,vf_of=v': PF `v` is itself a VF (of `p`); a VF cannot \
         have VFs"
    );
}

#[test]
fn vf_with_a_slot() {
    let why = "a VF takes no slot=: it sits at its PF's devfn + 1 + VF index";
    assert_eq!(
        message(&[], &["tap=a,id=pf0,slot=3", "tap=b,vf_of=pf0,slot=3"]),
        format!("invalid device spec 'tap=b,vf_of=pf0,slot=3': {why}")
    );
    assert_eq!(
        message(&["path=/x,id=d0", "path=/y,slot=9,vf_of=d0"], &[]),
        format!("invalid device spec 'path=/y,slot=9,vf_of=d0': {why}")
    );
}

/// A PF spec `pf` followed by `n` VFs of it.
fn pf_and_vfs(pf: &str, n: usize) -> Vec<String> {
    std::iter::once(pf.to_string())
        .chain((0..n).map(|i| format!("tap=v{i},vf_of=pf0")))
        .collect()
}

/// Validates NICs `specs`; the error message, or `None` if they are valid.
fn nets_result(specs: &[String]) -> Option<String> {
    let dir = files();
    let specs: Vec<&str> = specs.iter().map(String::as_str).collect();
    builder(&dir)
        .apply(devices(&[], &specs))
        .validate(&HOST)
        .err()
        .map(|e| e.to_string())
}

#[test]
fn vfs_must_fit_after_an_explicit_slot() {
    // slot 31: devfn 0xF8, so functions 1..=7 hold VFs 0..=6.
    assert_eq!(nets_result(&pf_and_vfs("tap=p,id=pf0,slot=31", 7)), None);
    assert_eq!(
        nets_result(&pf_and_vfs("tap=p,id=pf0,slot=31", 8)).as_deref(),
        Some(
            "invalid device spec 'tap=p,id=pf0,slot=31': PF `pf0` at slot 31 has 8 VFs, but at \
             most 7 fit there (the last VF's devfn, slot * 8 + VFs, must be <= 0xFF)"
        )
    );
    // slot 1: devfn 8, VFs at devfn 9..=0xFF.
    assert_eq!(nets_result(&pf_and_vfs("tap=p,id=pf0,slot=1", 247)), None);
    let err = nets_result(&pf_and_vfs("tap=p,id=pf0,slot=1", 248)).expect("248 VFs");
    assert!(err.ends_with("PF `pf0` at slot 1 has 248 VFs, but at most 247 fit there (the last VF's devfn, slot * 8 + VFs, must be <= 0xFF)"), "{err}");
    // Without a slot only the per-PF maximum applies (placement is the VMM's job).
    assert_eq!(
        nets_result(&pf_and_vfs("tap=p,id=pf0", usize::from(MAX_VFS_PER_PF))),
        None
    );
}

#[test]
fn at_most_max_vfs_per_pf() {
    let n = usize::from(MAX_VFS_PER_PF) + 1;
    assert_eq!(
        nets_result(&pf_and_vfs("tap=p,id=pf0", n)).as_deref(),
        Some(
            "invalid device spec 'tap=p,id=pf0': PF `pf0` has 249 VFs, more than the maximum \
             of 248"
        )
    );
}

#[test]
fn vf_iommu_needs_pf_iommu() {
    assert_eq!(
        message(&[], &["tap=a,id=pf0", "tap=b,vf_of=pf0,iommu=on"]),
        "invalid device spec 'tap=b,vf_of=pf0,iommu=on': iommu=on on a VF needs iommu=on on \
         its PF `pf0`"
    );
    assert_eq!(
        message(
            &["path=/x,id=d0,iommu=off", "path=/y,vf_of=d0,iommu=on"],
            &[]
        ),
        "invalid device spec 'path=/y,vf_of=d0,iommu=on': iommu=on on a VF needs iommu=on on \
         its PF `d0`"
    );
    // A PF behind the IOMMU may have VFs that are not, and VFs that are.
    let dir = files();
    let cfg = valid(
        &dir,
        devices(
            &[],
            &[
                "tap=a,id=pf0,iommu=on",
                "tap=b,vf_of=pf0",
                "tap=c,vf_of=pf0,iommu=on",
            ],
        ),
        true,
    );
    let iommu: Vec<_> = cfg.nets.iter().map(|n| n.iommu).collect();
    assert_eq!(iommu, [true, false, true]);
}

#[test]
fn sriov_checks_come_before_file_checks() {
    // The images do not exist; the SR-IOV error is reported first.
    let msg = message(&["path=/nonexistent/a.img,vf_of=zz"], &[]);
    assert!(msg.ends_with("unknown PF id `zz`"), "{msg}");
}

#[test]
fn config_files_with_vfs() {
    let dir = files();
    let (pf, vf0, vf1) = (
        image(&dir, "pf.img"),
        image(&dir, "vf0.img"),
        image(&dir, "vf1.img"),
    );
    let k = dir.path().join("vmlinux");
    let disks = [
        format!("id=d0,path={pf}"),
        format!("path={vf0},vf_of=d0"),
        format!("path={vf1},vf_of=d0,readonly=on"),
    ];
    let nets = [
        "id=pf0,tap=tpf0,slot=5",
        "tap=tvf0,vf_of=pf0",
        "tap=tvf1,vf_of=pf0,mac=02:00:00:00:00:01",
    ];
    let toml = format!("kernel = {k:?}\ndisk = {disks:?}\nnet = {nets:?}\n");
    let json = format!(r#"{{"kernel": {k:?}, "disk": {disks:?}, "net": {nets:?}}}"#);
    std::fs::write(dir.path().join("vm.toml"), toml).expect("write");
    std::fs::write(dir.path().join("vm.json"), json).expect("write");
    let load = |name: &str| {
        let file = load_file(&dir.path().join(name)).expect(name);
        ConfigBuilder::new()
            .apply(file)
            .kvm_device("/dev/null")
            .validate(&HOST)
            .expect(name)
    };
    let cfg = load("vm.toml");
    assert_eq!(cfg, load("vm.json"));
    let paths: Vec<_> = cfg
        .disk_vfs(&cfg.disks[0])
        .iter()
        .map(|d| d.path.display().to_string())
        .collect();
    assert_eq!(paths, [vf0, vf1]);
    assert!(cfg.disk_vfs(&cfg.disks[0])[1].read_only);
    assert_eq!(taps(&cfg.net_vfs(&cfg.nets[0])), ["tvf0", "tvf1"]);
    assert_eq!(cfg.nets[0].slot, Some(5));
    assert_eq!(
        cfg.nets[2],
        NetConfig {
            backend: NetBackendConfig::Tap("tvf1".into()),
            mac: MacAddr([2, 0, 0, 0, 0, 1]),
            num_queue_pairs: 1,
            queue_size: 256,
            slot: None,
            iommu: false,
            id: None,
            vf_of: Some("pf0".into()),
        }
    );
    // The same rules apply to a file's devices.
    std::fs::write(
        dir.path().join("bad.json"),
        format!(r#"{{"kernel": {k:?}, "net": ["tap=a,vf_of=nope"]}}"#),
    )
    .expect("write");
    let err = ConfigBuilder::new()
        .apply(load_file(&dir.path().join("bad.json")).expect("parses"))
        .kvm_device("/dev/null")
        .validate(&HOST)
        .expect_err("unknown PF");
    assert_eq!(
        err.to_string(),
        "invalid device spec 'tap=a,vf_of=nope': unknown PF id `nope`"
    );
}
