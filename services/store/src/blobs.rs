//! Blobs (export parts) through one object-store interface: a local directory by default,
//! S3-compatible storage in production. The `object_store` crate does the talking; this module
//! only chooses the backend from a URL and names the operations baton uses.
//!
//! Part blobs are LZ4 frames (`lz4_flex`, pure Rust): compression costs a few percent of a part's
//! production time, where zstd or gzip would cost more than reading the rows.

use std::io::{Read, Write};
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::Error;

/// The blob store: cheap to clone.
#[derive(Debug, Clone)]
pub struct Blobs {
    inner: Arc<dyn ObjectStore>,
    /// The key prefix every blob is under (the URL's path for object stores).
    root: Path,
    /// The URL it was opened from, for messages.
    url: String,
}

/// A blob compressed as its data arrives, for [`Blobs::put`]: a part is never held whole
/// uncompressed, and compressing one piece can overlap reading the next.
pub struct Compressor(lz4_flex::frame::FrameEncoder<Vec<u8>>);

impl Compressor {
    /// An empty blob, its buffer sized for `bytes` compressed.
    pub fn with_capacity(bytes: usize) -> Self {
        Self(lz4_flex::frame::FrameEncoder::new(Vec::with_capacity(bytes)))
    }

    /// Appends `data`.
    pub fn write(&mut self, data: &[u8]) -> Result<(), Error> {
        self.0.write_all(data).map_err(blob_error)
    }
}

fn blob_error(e: impl std::fmt::Display) -> Error {
    Error::Blob(e.to_string())
}

impl Blobs {
    /// Opens the blob store at `location`: a directory path, a `file://`
    /// URL, or an `s3://bucket/prefix` URL configured by the usual `AWS_*` variables
    /// (`AWS_ENDPOINT` and `AWS_ALLOW_HTTP=true` for an S3-compatible server), or `memory://`
    /// (tests).
    pub fn open(location: &str) -> Result<Self, Error> {
        let bad = |reason: String| Error::Url { url: location.to_owned(), reason };
        // a local directory is created by the first write, not here: a process that never
        // writes a part (a worker of batches only) leaves nothing behind
        let url = if location.contains("://") {
            url::Url::parse(location).map_err(|e| bad(e.to_string()))?
        } else {
            let dir = std::path::absolute(location).map_err(|e| bad(e.to_string()))?;
            url::Url::from_directory_path(&dir).map_err(|()| bad("not an absolute directory".into()))?
        };
        let options: Vec<(String, String)> =
            std::env::vars().filter(|(k, _)| k.starts_with("AWS_") || k.starts_with("OBJECT_STORE_")).collect();
        let (store, root) = object_store::parse_url_opts(&url, options).map_err(|e| bad(e.to_string()))?;
        Ok(Self { inner: Arc::from(store), root, url: location.to_owned() })
    }

    /// Where the blobs are, as given.
    pub fn location(&self) -> &str {
        &self.url
    }

    fn path(&self, key: &str) -> Path {
        key.split('/').fold(self.root.clone(), |path, part| path.join(part))
    }

    /// Writes a blob compressed as its data came under `key`; answers the compressed size.
    pub async fn put(&self, key: &str, blob: Compressor) -> Result<u64, Error> {
        let compressed = blob.0.finish().map_err(blob_error)?;
        let size = compressed.len() as u64;
        self.inner.put(&self.path(key), PutPayload::from(compressed)).await.map_err(blob_error)?;
        Ok(size)
    }

    /// Reads and decompresses the blob under `key`.
    pub async fn get_decompressed(&self, key: &str) -> Result<Vec<u8>, Error> {
        let compressed =
            self.inner.get(&self.path(key)).await.map_err(blob_error)?.bytes().await.map_err(blob_error)?;
        let mut data = Vec::with_capacity(compressed.len() * 3);
        lz4_flex::frame::FrameDecoder::new(&compressed[..])
            .read_to_end(&mut data)
            .map_err(|e| Error::Corrupt(format!("blob {key}: {e}")))?;
        Ok(data)
    }

    /// Deletes the blob under `key` (a missing one is not an error).
    pub async fn delete(&self, key: &str) -> Result<(), Error> {
        match self.inner.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(blob_error(e)),
        }
    }

    /// Deletes every blob under the key prefix `prefix`; answers how many.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<usize, Error> {
        let listed: Vec<_> = self.inner.list(Some(&self.path(prefix))).try_collect().await.map_err(blob_error)?;
        for meta in &listed {
            match self.inner.delete(&meta.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(blob_error(e)),
            }
        }
        Ok(listed.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn put(blobs: &Blobs, key: &str, data: &[u8]) -> u64 {
        let mut blob = Compressor::with_capacity(data.len());
        blob.write(data).unwrap();
        blobs.put(key, blob).await.unwrap()
    }

    #[tokio::test]
    async fn a_local_directory_round_trips_and_deletes_by_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(dir.path().join("blobs").to_str().unwrap()).unwrap();
        let data = b"{\"id\":\"a\"}\n".repeat(1000);
        let size = put(&blobs, "exports/e1/00001-x", &data).await;
        assert!(size < data.len() as u64 / 4, "compressed to {size} bytes");
        put(&blobs, "exports/e1/00002-y", b"two").await;
        put(&blobs, "exports/e2/00001-z", b"other").await;
        assert_eq!(blobs.get_decompressed("exports/e1/00001-x").await.unwrap(), data);
        assert_eq!(blobs.delete_prefix("exports/e1").await.unwrap(), 2);
        assert!(blobs.get_decompressed("exports/e1/00002-y").await.is_err());
        assert_eq!(blobs.get_decompressed("exports/e2/00001-z").await.unwrap(), b"other");
        blobs.delete("exports/e2/00001-z").await.unwrap();
        blobs.delete("exports/e2/00001-z").await.unwrap();
    }

    #[test]
    fn a_bad_location_is_a_clear_error() {
        let e = Blobs::open("gopher://nowhere/x").unwrap_err();
        assert!(e.to_string().contains("gopher://nowhere/x"), "{e}");
    }
}
