use std::os::unix::fs::symlink;

use super::*;

/// A fake host: sysfs with PCI functions and IOMMU groups, and /dev/vfio.
struct Tree {
    dir: tempfile::TempDir,
}

impl Tree {
    fn new() -> Self {
        let t = Tree {
            dir: tempfile::tempdir().unwrap(),
        };
        for d in [
            "sys/devices/pci0000:00",
            "sys/bus/pci/drivers/vfio-pci",
            "sys/bus/pci/drivers/ixgbevf",
            "sys/bus/pci/drivers/pcieport",
            "dev/vfio/devices",
        ] {
            std::fs::create_dir_all(t.root().join(d)).unwrap();
        }
        t
    }
    fn root(&self) -> &Path {
        self.dir.path()
    }
    fn paths(&self) -> HostPaths {
        HostPaths {
            sys: self.root().join("sys"),
            dev: self.root().join("dev"),
        }
    }
    fn dev(&self, bdf: &str) -> PathBuf {
        self.root().join("sys/devices/pci0000:00").join(bdf)
    }
    /// A function bound to `driver` (or none) in IOMMU group `group` (or none).
    fn function(&self, bdf: &str, driver: Option<&str>, group: Option<u32>) -> PathBuf {
        let d = self.dev(bdf);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("config"), [0u8; 64]).unwrap();
        if let Some(drv) = driver {
            symlink(
                self.root().join("sys/bus/pci/drivers").join(drv),
                d.join("driver"),
            )
            .unwrap();
        }
        if let Some(g) = group {
            let gdir = self
                .root()
                .join("sys/kernel/iommu_groups")
                .join(g.to_string());
            std::fs::create_dir_all(gdir.join("devices")).unwrap();
            symlink(&gdir, d.join("iommu_group")).unwrap();
            symlink(&d, gdir.join("devices").join(bdf)).unwrap();
        }
        d
    }
    fn node(&self, rel: &str) -> PathBuf {
        let p = self.root().join("dev").join(rel);
        std::fs::write(&p, b"").unwrap();
        p
    }
}

#[test]
fn bdf_syntax() {
    assert!(is_bdf("0000:01:00.1"));
    assert!(is_bdf("abcd:ff:1f.7"));
    for bad in [
        "0000:01:00.8",
        "0000:01:00",
        "0000-01:00.1",
        "0000:0g:00.1",
        "x",
    ] {
        assert!(!is_bdf(bad), "{bad}");
    }
}

#[test]
fn a_viable_function_through_the_group() {
    let t = Tree::new();
    let f = t.function("0000:01:00.1", Some("vfio-pci"), Some(12));
    t.function("0000:01:00.0", Some("pcieport"), Some(12));
    t.function("0000:01:00.2", None, Some(12));
    let node = t.node("vfio/12");
    let h = check(&f, VfioBackendChoice::Auto, &t.paths()).unwrap();
    assert_eq!(h.bdf, "0000:01:00.1");
    assert_eq!(h.group, 12);
    assert_eq!(h.backend, Backend::Group(node.clone()));
    assert_eq!(
        check(&f, VfioBackendChoice::Group, &t.paths())
            .unwrap()
            .backend,
        Backend::Group(node)
    );
}

#[test]
fn cdev_when_the_host_has_it() {
    let t = Tree::new();
    let f = t.function("0000:01:00.1", Some("vfio-pci"), Some(3));
    t.node("vfio/3");
    std::fs::create_dir_all(f.join("vfio-dev/vfio0")).unwrap();
    // A cdev without /dev/iommu is not usable: auto takes the group, cdev refuses.
    let cdev = t.node("vfio/devices/vfio0");
    assert!(matches!(
        check(&f, VfioBackendChoice::Auto, &t.paths())
            .unwrap()
            .backend,
        Backend::Group(_)
    ));
    assert_eq!(
        check(&f, VfioBackendChoice::Cdev, &t.paths()),
        Err(HostError::NoCdev {
            bdf: "0000:01:00.1".into()
        })
    );
    t.node("iommu");
    assert_eq!(
        check(&f, VfioBackendChoice::Auto, &t.paths())
            .unwrap()
            .backend,
        Backend::Cdev(cdev.clone())
    );
    assert_eq!(
        check(&f, VfioBackendChoice::Cdev, &t.paths())
            .unwrap()
            .backend,
        Backend::Cdev(cdev)
    );
    assert!(matches!(
        check(&f, VfioBackendChoice::Group, &t.paths())
            .unwrap()
            .backend,
        Backend::Group(_)
    ));
}

#[test]
fn noiommu_groups() {
    let t = Tree::new();
    let f = t.function("0000:00:05.0", Some("vfio-pci"), Some(0));
    let node = t.node("vfio/noiommu-0");
    assert_eq!(
        check(&f, VfioBackendChoice::Auto, &t.paths())
            .unwrap()
            .backend,
        Backend::Group(node)
    );
}

#[test]
fn every_error_line() {
    let t = Tree::new();
    let p = t.paths();
    let not_pci = t.root().join("sys/devices/pci0000:00/nothing");
    std::fs::create_dir_all(&not_pci).unwrap();
    let e = check(&not_pci, VfioBackendChoice::Auto, &p).unwrap_err();
    assert_eq!(e, HostError::NotPci(not_pci.clone()));
    assert!(e
        .to_string()
        .ends_with("not a PCI function (expected /sys/bus/pci/devices/DDDD:BB:DD.F)"));
    // A BDF-named directory without config space is no function either.
    let empty = t.dev("0000:09:00.0");
    std::fs::create_dir_all(&empty).unwrap();
    assert_eq!(
        check(&empty, VfioBackendChoice::Auto, &p),
        Err(HostError::NotPci(empty))
    );

    let f = t.function("0000:01:00.1", Some("ixgbevf"), Some(7));
    let e = check(&f, VfioBackendChoice::Auto, &p).unwrap_err();
    assert_eq!(
        e.to_string(),
        "0000:01:00.1 is bound to ixgbevf, not vfio-pci; hand it over with: \
         echo 0000:01:00.1 > /sys/bus/pci/devices/0000:01:00.1/driver/unbind; \
         echo vfio-pci > /sys/bus/pci/devices/0000:01:00.1/driver_override; \
         echo 0000:01:00.1 > /sys/bus/pci/drivers_probe"
    );
    let f = t.function("0000:02:00.0", None, Some(8));
    assert!(check(&f, VfioBackendChoice::Auto, &p)
        .unwrap_err()
        .to_string()
        .starts_with(
            "0000:02:00.0 is bound to no driver; bind it to vfio-pci with: echo vfio-pci"
        ));

    let f = t.function("0000:03:00.0", Some("vfio-pci"), None);
    assert!(check(&f, VfioBackendChoice::Auto, &p)
        .unwrap_err()
        .to_string()
        .contains(
            "has no IOMMU group: the host has no IOMMU enabled (boot it with intel_iommu=on"
        ));

    let f = t.function("0000:04:00.0", Some("vfio-pci"), Some(9));
    t.function("0000:04:00.1", Some("ixgbevf"), Some(9));
    t.function("0000:04:00.2", Some("vfio-pci"), Some(9));
    assert_eq!(
        check(&f, VfioBackendChoice::Auto, &p)
            .unwrap_err()
            .to_string(),
        "IOMMU group 9 of 0000:04:00.0 is not viable: 0000:04:00.1 (bound to ixgbevf) \
         must be bound to vfio-pci too (or have no driver)"
    );

    let f = t.function("0000:05:00.0", Some("vfio-pci"), Some(10));
    assert_eq!(
        check(&f, VfioBackendChoice::Auto, &p)
            .unwrap_err()
            .to_string(),
        format!(
            "{} does not exist (is vfio-pci loaded and the function bound to it?)",
            t.root().join("dev/vfio/10").display()
        )
    );
}

#[test]
fn permission_on_the_group_node() {
    // access(2) ignores file modes for root; as anyone else a mode-0 node must fail.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        eprintln!(
            "skipped here: root can open any node (vmm/tests/cli.rs runs this check as nobody)"
        );
        return;
    }
    let t = Tree::new();
    let f = t.function("0000:06:00.0", Some("vfio-pci"), Some(11));
    let node = t.node("vfio/11");
    std::fs::set_permissions(&node, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    assert_eq!(
        check(&f, VfioBackendChoice::Auto, &t.paths()),
        Err(HostError::Permission(node))
    );
}
