"""Image documents: decoded with exactly the Pillow plugin of their sniffed type, upright, flattened to RGB."""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Any

from monkey_cli.documents.inputs import open_regular
from monkey_cli.documents.records import BYTES_PER_ALLOWED_PIXEL, Options, Page, Source, merge_warnings, one_line
from monkey_cli.documents.types import PILLOW_FORMATS
from monkey_cli.errors import DocumentError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

_EXIF_ORIENTATION = 0x0112


class ImageDocument:
    def __init__(self, source: Source, kind: str, sha256: str, options: Options) -> None:
        self.source, self.kind, self.sha256, self.options = source, kind, sha256, options
        self.warnings: list[str] = []
        if source.data is not None:
            stream: IO[bytes] = io.BytesIO(source.data)
        else:
            assert source.path is not None
            stream = open_regular(source.path)
        self.stream = stream
        try:
            with _collected_warnings(self.warnings):
                self.image, self.page_count = self._open(stream)
        except BaseException:
            stream.close()
            raise

    def _open(self, stream: IO[bytes]) -> tuple[Image.Image, int]:
        from PIL import Image

        try:
            image = Image.open(stream, formats=list(PILLOW_FORMATS[self.kind]))
        except Image.DecompressionBombError as exc:
            raise DocumentError(f"image refused as a possible decompression bomb: {one_line(exc)}") from exc
        except Exception as exc:
            raise DocumentError(f"cannot read {self.kind.upper()} image: {one_line(exc)}") from exc
        try:
            self._check_size(image)
            # Multi-page TIFFs give every frame; animations (GIF, WEBP, APNG, MPO) give their first frame.
            count = image.n_frames if self.kind == "tiff" else 1
        except DocumentError:
            image.close()
            raise
        except Exception as exc:  # a damaged chain of TIFF directories
            image.close()
            raise DocumentError(f"cannot read {self.kind.upper()} image: {one_line(exc)}") from exc
        return image, count

    def _check_size(self, image: Image.Image) -> None:
        """Refuse, before decoding, an image whose pixels or decoded bytes are over the limits."""
        width, height = image.size
        if width * height > self.options.max_pixels:
            raise DocumentError(
                f"image is {width}x{height} = {width * height:,} pixels, over the limit of "
                f"{self.options.max_pixels:,} (possible decompression bomb)"
            )
        per_pixel = bytes_per_pixel(image.mode)
        decoded = width * height * per_pixel
        if decoded > self.options.max_image_bytes:
            raise DocumentError(
                f"image is {width}x{height} {image.mode}, {decoded:,} bytes decoded ({per_pixel} per pixel), over "
                f"the limit of {self.options.max_image_bytes:,} bytes ({BYTES_PER_ALLOWED_PIXEL} per allowed pixel; "
                "possible decompression bomb)"
            )

    def page(self, number: int) -> Page:
        from PIL import Image

        page_warnings = list(self.warnings)
        with _collected_warnings(page_warnings):
            rgb, dpi = self._decode(number, page_warnings)
        original_size = rgb.size
        size = self.options.size
        if size is not None and rgb.size != (size[1], size[0]):
            rgb = rgb.resize((size[1], size[0]), Image.Resampling.BICUBIC)
        return Page(
            source=self.source.name,
            page=number,
            pages=self.page_count,
            image=rgb,
            kind=self.kind,
            original_size=original_size,
            dpi=dpi,
            warnings=tuple(page_warnings),
            sha256=self.sha256,
            path=self.source.path,
        )

    def _decode(self, number: int, notes: list[str]) -> tuple[Image.Image, tuple[float, float] | None]:
        """Frame `number` decoded, upright and in RGB, and its stored resolution."""
        frame = self.image
        if self.page_count > 1:
            frame.seek(number - 1)
            self._check_size(frame)
        try:
            frame.load()
        except OSError as exc:
            raise DocumentError(f"image data is truncated or damaged ({one_line(exc)})") from exc
        dpi = _image_dpi(frame)
        upright, turned = _exif_upright(frame, notes)
        if turned and dpi is not None:
            dpi = (dpi[1], dpi[0])
        return _to_rgb(upright), dpi

    def close(self) -> None:
        self.image.close()
        self.stream.close()


def bytes_per_pixel(mode: str) -> int:
    """Bytes a decoded pixel of Pillow mode `mode` takes: channels x bytes per channel (1-bit counts 1)."""
    from PIL import Image

    try:
        channels = Image.getmodebands(mode)
    except (KeyError, ValueError):
        return 4  # an unusual packed mode: count it as the widest common one
    if mode.startswith("I;16"):
        return 2 * channels
    if mode in ("I", "F") or mode.startswith(("I;32", "F;")):
        return 4 * channels
    return channels


# --- warnings raised while decoding (Pillow's "Corrupt EXIF data", ...) -----------------------------------
# They belong to the page being decoded, which happens in the prefetch thread while the main thread may warn
# about other things: a thread-local sink collects the current thread's warnings into the page's notes, and
# every other warning goes on to whoever handled warnings before.

_sink = threading.local()
_previous_showwarning: Callable[..., Any] | None = None


def _showwarning(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    notes = getattr(_sink, "notes", None)
    if notes is None:
        assert _previous_showwarning is not None
        _previous_showwarning(message, category, *args, **kwargs)
        return
    from PIL import Image

    if not issubclass(category, Image.DecompressionBombWarning):  # the explicit limits above say it better
        notes.append(one_line(str(message)))


@contextmanager
def _collected_warnings(notes: list[str]) -> Iterator[None]:
    global _previous_showwarning
    if warnings.showwarning is not _showwarning:  # (re)installed: tools such as pytest swap the hook per test
        _previous_showwarning = warnings.showwarning
        warnings.showwarning = _showwarning
    # Pillow warns through `warnings`, whose default is to say a message once per process: every document
    # must get its own note, so Pillow's warnings are always passed on.
    warnings.filterwarnings("always", module=r"PIL(\.|$)")
    outer = getattr(_sink, "notes", None)
    collected: list[str] = []
    _sink.notes = collected
    try:
        yield
    finally:
        _sink.notes = outer
        merge_warnings(notes, collected)


def _image_dpi(image: Image.Image) -> tuple[float, float] | None:
    dpi = image.info.get("dpi")
    try:
        x, y = (float(value) for value in dpi)
    except (TypeError, ValueError):
        return None
    return (round(x, 2), round(y, 2)) if x > 0 and y > 0 else None


def _exif_upright(image: Image.Image, notes: list[str]) -> tuple[Image.Image, bool]:
    """The image turned as its EXIF orientation says, and whether width and height swapped."""
    from PIL import ImageOps

    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        upright = ImageOps.exif_transpose(image)
    except Exception as exc:  # a damaged EXIF block should cost the orientation, not the page
        notes.append(f"ignored unreadable EXIF data ({one_line(exc)})")
        return image, False
    return upright, orientation in (5, 6, 7, 8)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels as a viewer would show them: alpha flattened onto white, 16-bit and 1-bit scaled right."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        return _on_white(image) if has_alpha else image
    if mode in ("RGBA", "RGBa", "LA", "La"):
        return _on_white(image.convert("RGBA"))
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    if mode.startswith("I;16") or (mode == "I" and image.getextrema()[1] > 255):
        # 16-bit samples: scale 0..65535 to 0..255 (a plain convert("L") would clip everything above 255).
        return image.point(lambda value: value / 257).convert("L").convert("RGB")
    if mode in ("I", "F"):
        return image.convert("L").convert("RGB")
    try:
        return image.convert("RGB")  # "1", "L", "YCbCr", "LAB", "HSV"
    except (ValueError, OSError) as exc:
        raise DocumentError(f"cannot convert {mode} pixels to RGB ({one_line(exc)})") from exc


def _on_white(rgba: Image.Image) -> Image.Image:
    from PIL import Image

    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    """Use the file's ICC profile when it has one (print CMYK is not 255 - C); else Pillow's formula."""
    profile = image.info.get("icc_profile")
    if profile:
        try:
            from PIL import ImageCms

            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:  # a broken profile: fall back to the plain conversion below
            pass
    return image.convert("RGB")
