//! An OCI image layout writer: one image of one layer, as a tar archive
//! (`oci-layout`, `index.json`, `blobs/sha256/...`) that `ctr images import`
//! reads. The output depends only on the input: entries sorted, owner 0,
//! mtime 0, gzip without a name or time, JSON with a fixed field order and
//! no creation date; so the same binaries make the same digests.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

use flate2::write::GzEncoder;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// One file of an image.
#[derive(Debug, Clone)]
pub struct File {
    /// Its path in the image, without a leading `/`, e.g. `usr/local/bin/tabby`.
    pub path: String,
    /// Its permission bits, e.g. 0o755.
    pub mode: u32,
    /// Its contents.
    pub data: Vec<u8>,
}

/// A symbolic link of an image: `(path, target)`.
pub type Link = (String, String);

/// One image: a name, how it runs, its files.
#[derive(Debug, Clone)]
pub struct Image {
    /// The reference containerd tags it with, e.g. `lab.tabby.dev/echo:dev`.
    pub name: String,
    /// The entrypoint.
    pub entrypoint: Vec<String>,
    /// `KEY=value` environment.
    pub env: Vec<String>,
    /// Empty directories beside the files' parents (`tmp` gets mode 1777).
    pub dirs: Vec<String>,
    /// The files.
    pub files: Vec<File>,
    /// Symbolic links: `(path, target)`, e.g. `("usr/sbin/iptables-nft-save", "xtables-nft-multi")`.
    pub links: Vec<Link>,
}

/// A blob's digest and size, as descriptors name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Descriptor {
    /// The media type.
    #[serde(rename = "mediaType")]
    pub media_type: &'static str,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Bytes.
    pub size: u64,
    /// Annotations (the index's image name).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<&'static str, String>,
    /// The platform (the index's entry).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

/// An image's platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Platform {
    /// e.g. `amd64`.
    pub architecture: &'static str,
    /// e.g. `linux`.
    pub os: &'static str,
}

/// The images' platform: the lab's binaries are x86-64 Linux.
const PLATFORM: Platform = Platform {
    architecture: "amd64",
    os: "linux",
};

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const INDEX: &str = "application/vnd.oci.image.index.v1+json";

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn descriptor(media_type: &'static str, data: &[u8]) -> Descriptor {
    Descriptor {
        media_type,
        digest: sha256(data),
        size: data.len() as u64,
        annotations: BTreeMap::new(),
        platform: None,
    }
}

/// A tar header for `path` with fixed owner and time.
fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(size);
    h
}

/// The uncompressed layer: every directory (parents of the files and
/// `image.dirs`), then the files, each list sorted.
pub fn layer_tar(image: &Image) -> std::io::Result<Vec<u8>> {
    let mut dirs: BTreeSet<String> = image.dirs.iter().cloned().collect();
    let paths = (image.files.iter().map(|f| &f.path)).chain(image.links.iter().map(|(p, _)| p));
    for path in paths {
        let mut parent = std::path::Path::new(path).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            dirs.insert(p.display().to_string());
            parent = p.parent();
        }
    }
    let mut builder = tar::Builder::new(Vec::new());
    for dir in &dirs {
        let mode = if dir == "tmp" { 0o1777 } else { 0o755 };
        let mut h = header(tar::EntryType::Directory, mode, 0);
        builder.append_data(&mut h, format!("{dir}/"), std::io::empty())?;
    }
    let mut files: Vec<&File> = image.files.iter().collect();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    for file in files {
        let mut h = header(tar::EntryType::Regular, file.mode, file.data.len() as u64);
        builder.append_data(&mut h, &file.path, file.data.as_slice())?;
    }
    let mut links: Vec<&Link> = image.links.iter().collect();
    links.sort();
    for (path, target) in links {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        builder.append_link(&mut h, path, target)?;
    }
    builder.into_inner()
}

fn gzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    // No file name, mtime 0: GzBuilder's defaults.
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    gz.write_all(data)?;
    gz.finish()
}

#[derive(Serialize)]
struct RunConfig<'a> {
    #[serde(rename = "Entrypoint")]
    entrypoint: &'a [String],
    #[serde(rename = "Env")]
    env: &'a [String],
    #[serde(rename = "WorkingDir")]
    working_dir: &'static str,
}

#[derive(Serialize)]
struct Rootfs {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: Vec<String>,
}

#[derive(Serialize)]
struct ImageConfig<'a> {
    architecture: &'static str,
    os: &'static str,
    config: RunConfig<'a>,
    rootfs: Rootfs,
}

#[derive(Serialize)]
struct Manifest {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Serialize)]
struct Index {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    manifests: Vec<Descriptor>,
}

/// Writes `image` as an OCI layout tar to `out`; returns the manifest's
/// descriptor (its digest is the image's).
pub fn write_layout(image: &Image, out: impl Write) -> std::io::Result<Descriptor> {
    let layer = layer_tar(image)?;
    let diff_id = sha256(&layer);
    let layer_gz = gzip(&layer)?;
    let config = serde_json::to_vec(&ImageConfig {
        architecture: PLATFORM.architecture,
        os: PLATFORM.os,
        config: RunConfig {
            entrypoint: &image.entrypoint,
            env: &image.env,
            working_dir: "/",
        },
        rootfs: Rootfs {
            kind: "layers",
            diff_ids: vec![diff_id],
        },
    })?;
    let manifest = serde_json::to_vec(&Manifest {
        schema_version: 2,
        media_type: MANIFEST,
        config: descriptor(CONFIG, &config),
        layers: vec![descriptor(LAYER, &layer_gz)],
    })?;
    let mut entry = descriptor(MANIFEST, &manifest);
    entry.platform = Some(PLATFORM);
    entry
        .annotations
        .insert("io.containerd.image.name", image.name.clone());
    let tag = image
        .name
        .rsplit_once(':')
        .map(|(_, t)| t)
        .unwrap_or("latest");
    entry
        .annotations
        .insert("org.opencontainers.image.ref.name", tag.to_string());
    let index = serde_json::to_vec(&Index {
        schema_version: 2,
        media_type: INDEX,
        manifests: vec![entry.clone()],
    })?;

    let mut tar = tar::Builder::new(out);
    let mut add = |path: &str, data: &[u8]| {
        let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
        tar.append_data(&mut h, path, data)
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json", &index)?;
    let mut blobs = vec![layer_gz, config, manifest];
    blobs.sort_by_key(|b| sha256(b));
    for blob in &blobs {
        let hex = &sha256(blob)["sha256:".len()..];
        add(&format!("blobs/sha256/{hex}"), blob)?;
    }
    tar.into_inner()?.flush()?;
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> Image {
        Image {
            name: "lab.tabby.dev/echo:dev".into(),
            entrypoint: vec!["/usr/local/bin/tabby-echo".into()],
            env: vec!["PATH=/usr/local/bin".into()],
            dirs: vec!["tmp".into(), "etc".into()],
            files: vec![File {
                path: "usr/local/bin/tabby-echo".into(),
                mode: 0o755,
                data: b"#!/bin/true\n".to_vec(),
            }],
            links: vec![("usr/bin/echo".into(), "../local/bin/tabby-echo".into())],
        }
    }

    #[test]
    fn the_same_image_makes_the_same_bytes_and_another_file_another_digest() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let da = write_layout(&image(), &mut a).unwrap();
        let db = write_layout(&image(), &mut b).unwrap();
        assert_eq!(a, b);
        assert_eq!(da, db);
        let mut other = image();
        other.files[0].data.push(b'x');
        let dc = write_layout(&other, Vec::new()).unwrap();
        assert_ne!(da.digest, dc.digest);
    }

    #[test]
    fn the_layout_holds_an_index_naming_the_image_and_every_blob_it_points_to() {
        let mut out = Vec::new();
        let manifest = write_layout(&image(), &mut out).unwrap();
        let mut archive = tar::Archive::new(out.as_slice());
        let mut files = BTreeMap::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().display().to_string();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
            files.insert(path, data);
        }
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
        let entry = &index["manifests"][0];
        assert_eq!(
            entry["annotations"]["io.containerd.image.name"],
            "lab.tabby.dev/echo:dev"
        );
        assert_eq!(entry["digest"], manifest.digest.as_str());
        let blob = |digest: &str| &files[&format!("blobs/sha256/{}", &digest[7..])];
        let m: serde_json::Value = serde_json::from_slice(blob(&manifest.digest)).unwrap();
        let config: serde_json::Value =
            serde_json::from_slice(blob(m["config"]["digest"].as_str().unwrap())).unwrap();
        assert_eq!(
            config["config"]["Entrypoint"][0],
            "/usr/local/bin/tabby-echo"
        );
        // The layer's diff ID is the digest of the uncompressed tar.
        let layer_gz = blob(m["layers"][0]["digest"].as_str().unwrap());
        let mut layer = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::GzDecoder::new(layer_gz.as_slice()),
            &mut layer,
        )
        .unwrap();
        assert_eq!(config["rootfs"]["diff_ids"][0], sha256(&layer).as_str());
        let names: Vec<String> = tar::Archive::new(layer.as_slice())
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "etc/",
                "tmp/",
                "usr/",
                "usr/bin/",
                "usr/local/",
                "usr/local/bin/",
                "usr/local/bin/tabby-echo",
                "usr/bin/echo"
            ]
        );
        let link = tar::Archive::new(layer.as_slice())
            .entries()
            .unwrap()
            .map(|e| e.unwrap())
            .find(|e| e.header().entry_type() == tar::EntryType::Symlink)
            .map(|e| e.link_name().unwrap().unwrap().display().to_string());
        assert_eq!(link.as_deref(), Some("../local/bin/tabby-echo"));
    }
}
