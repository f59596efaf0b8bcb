"""Downloads: streamed ZIPs and manifests on the server, folder downloads, decryption and reading on the client.

    download.py   server side: plan, audit, stream a ZIP (plain or age-encrypted), serve single files
    batch.py      server side: the CLI's files in batches, as a tar stream
    sources.py    server side: the bytes each file carries (as cached, or de-identified), read ahead
    tickets.py    server side: which files a folder download's audit event lets the CLI fetch
    fetch.py      client side: a resumable folder download, encrypting as bytes arrive
    reader.py     client side: open_download() for plain/encrypted folders and ZIPs; decrypt_download()
    layout.py     readable and keyed names, the manifest, the README (shared by both sides)
"""

from mi2b2.services.export.reader import DecryptReport, DownloadEntry, DownloadReader, decrypt_download, open_download

__all__ = ["DecryptReport", "DownloadEntry", "DownloadReader", "decrypt_download", "open_download"]
