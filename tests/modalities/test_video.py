import numpy as np
import pytest
import torch
from PIL import Image

from mmfusion.data.synthetic import SyntheticWorld, WorldConfig
from mmfusion.errors import DataError
from mmfusion.modalities.video import VideoEncoder, preprocess_video, preprocess_videos, sample_frame_indices


def numbered_clip(t: int, side: int = 4) -> np.ndarray:
    """(t, side, side, 3) uint8 whose frame i is filled with the value 10 * i."""
    return np.stack([np.full((side, side, 3), 10 * i, np.uint8) for i in range(t)])


def frame_ids(video: torch.Tensor) -> list[int]:
    return [round(v) for v in ((video[:, 0, 0, 0] + 1) * 127.5 / 10).tolist()]


def test_frame_sampling_indices():
    assert sample_frame_indices(8, 4) == [1, 3, 5, 7]  # segment centres 1, 3, 5, 7
    assert sample_frame_indices(3, 6) == [0, 0, 1, 1, 2, 2]  # each frame repeated twice
    assert sample_frame_indices(5, 5) == [0, 1, 2, 3, 4]
    assert sample_frame_indices(1, 3) == [0, 0, 0]
    with pytest.raises(DataError):
        sample_frame_indices(0, 4)


def test_preprocess_video_inputs_agree():
    clip = numbered_clip(8)
    video = preprocess_video(clip, num_frames=4, size=4)
    assert video.shape == (4, 3, 4, 4) and video.min() >= -1 and video.max() <= 1
    assert frame_ids(video) == [1, 3, 5, 7]
    assert frame_ids(preprocess_video(numbered_clip(3), num_frames=6, size=4)) == [0, 0, 1, 1, 2, 2]
    as_pil = preprocess_video([Image.fromarray(f) for f in clip], num_frames=4, size=4)
    as_tensor = preprocess_video(torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 127.5 - 1, 4, 4)
    assert torch.equal(video, as_pil) and torch.allclose(video, as_tensor)
    assert preprocess_video(numbered_clip(2, side=10), num_frames=3, size=6).shape == (3, 3, 6, 6)
    assert preprocess_videos([clip, clip[:3]], num_frames=4, size=4).shape == (2, 4, 3, 4, 4)
    with pytest.raises(DataError, match="expected"):
        preprocess_video(np.zeros((4, 4), np.uint8), 2, 4)


def test_encoder_shapes_and_frame_order_matters():
    torch.manual_seed(0)
    enc = VideoEncoder(
        num_frames=4, image_size=16, patch_size=8, width=32, depth=1, heads=4, embed_dim=8
    ).eval()
    videos = torch.randn(2, 4, 3, 16, 16)
    assert enc.forward_tokens(videos).shape == (2, 1 + 4 * 4, 32)
    out = enc(videos)
    assert out.shape == (2, 8)
    # temporal positions make the encoder see order: reversing time changes the embedding
    assert not torch.allclose(out, enc(videos.flip(1)), atol=1e-4)
    conv = VideoEncoder(4, 16, 8, 32, 1, 4, 8, stem="conv")
    assert conv(videos).shape == (2, 8)
    with pytest.raises(DataError, match="preprocess_videos"):
        enc(torch.randn(2, 3, 3, 16, 16))


def test_encoder_learns_motion_direction():
    torch.manual_seed(0)
    world = SyntheticWorld(WorldConfig(image_size=16, video_frames=8))
    clips, labels = [], []
    for i in range(60):
        scene = world.scene("train", i)
        if scene.motion in ("left", "right") and len(clips) < 8:
            clips.append(world.render_video(scene))
            labels.append(int(scene.motion == "right"))
    videos = preprocess_videos(clips, num_frames=4, size=16)
    labels = torch.tensor(labels)
    assert 0 < int(labels.sum()) < len(labels)
    enc = VideoEncoder(num_frames=4, image_size=16, patch_size=4, width=32, depth=1, heads=4, embed_dim=2)
    opt = torch.optim.AdamW(enc.parameters(), lr=3e-3)
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(enc(videos), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_tubelets_group_consecutive_frames():
    torch.manual_seed(0)
    enc = VideoEncoder(4, 16, 8, 32, 1, 4, 8, tubelet=2).eval()
    videos = torch.randn(2, 4, 3, 16, 16)
    assert enc.forward_tokens(videos).shape == (2, 1 + 2 * 4, 32)  # 2 tubelets x 4 patches
    assert enc.patch_embed.weight.shape == (32, 6, 8, 8)  # one conv over 2 frames x 3 channels
    # swapping the two frames inside a tubelet changes its token (the conv sees their order)
    swapped = videos[:, [1, 0, 2, 3]]
    assert not torch.allclose(enc(videos), enc(swapped), atol=1e-4)
    with pytest.raises(ValueError, match="tubelet"):
        VideoEncoder(4, 16, 8, 32, 1, 4, 8, tubelet=3)
