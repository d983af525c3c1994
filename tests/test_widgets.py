"""Widgets driven through their public methods and simulated canvas events; masks checked exactly."""
import numpy as np
import pytest
import torch
from skimage import data

from dedit_nb import masks as M
from dedit_nb.images import resize_rgb
from dedit_nb.session import Session
from widgets import ItemPalette, ItemsEditor, ItemState, MaskEditor, ResultGallery, disk_stroke
from widgets.gallery import before_after


@pytest.fixture
def state():
    img = resize_rgb(data.coffee(), (96, 64))
    labels = np.zeros((64, 96), np.int32)
    labels[:, 48:] = 1
    labels[:16] = 2
    return ItemState(img, labels, ["left", "right", "top"])


def assert_partition(state):
    assert state.labels.min() >= 0 and state.labels.max() < state.num_items
    assert state.labels.shape == state.image.shape[:2]


def test_a_brush_click_assigns_exactly_the_disk(state):
    editor = MaskEditor(state)
    editor.size.value = 3
    state.selected = 1
    before = state.labels.copy()
    editor.mouse_down(20.5, 30.9)
    editor.mouse_up(20.5, 30.9)
    yy, xx = np.mgrid[0:64, 0:96]
    disk = (yy - 30) ** 2 + (xx - 20) ** 2 <= 9
    assert np.array_equal(state.labels[disk], np.ones(disk.sum(), np.int32))
    assert np.array_equal(state.labels[~disk], before[~disk])
    assert_partition(state)


def test_a_dragged_stroke_is_one_undoable_operation(state):
    editor = MaskEditor(state)
    editor.size.value = 2
    state.selected = 2
    before = state.labels.copy()
    editor.mouse_down(10, 40)
    for x in range(11, 40, 3):
        editor.mouse_move(x, 40)
    editor.mouse_up(40, 40)
    expected = disk_stroke(state.labels.shape, [(10, 40)] + [(x, 40) for x in range(11, 40, 3)] + [(40, 40)], 2)
    assert np.array_equal(state.labels == 2, (before == 2) | expected)
    after = state.labels.copy()
    editor.key_down("z", ctrl_key=True)
    assert np.array_equal(state.labels, before)                 # undo: bit for bit
    editor.key_down("z", ctrl_key=True, shift_key=True)
    assert np.array_equal(state.labels, after)                  # redo


def test_eraser_gives_pixels_back_to_their_saved_item(state):
    editor = MaskEditor(state)
    editor.size.value = 4
    state.selected = 2
    editor.mouse_down(70, 40); editor.mouse_up(70, 40)           # paint "top" into "right"
    painted = state.labels == 2
    editor.tool.value = "eraser"
    editor.mouse_down(70, 40); editor.mouse_up(70, 40)
    assert np.array_equal(state.labels, state.saved[0])          # back to where they came from
    state.erase(np.ones_like(painted), item=2, to_item=0)        # or to a chosen item
    assert not (state.labels == 2).any() and (state.labels[:16, :48] == 0).all()
    assert_partition(state)


def test_fill_polygon_and_keyboard_tools(state):
    editor = MaskEditor(state)
    state.selected = 0
    editor.key_down("p")
    assert editor.tool.value == "polygon"
    for x, y in [(60, 30), (90, 30), (90, 60)]:
        editor.mouse_down(x, y); editor.mouse_up(x, y)
    editor.key_down("Enter")
    from skimage.draw import polygon
    rr, cc = polygon(np.array([30, 30, 60]), np.array([60, 90, 90]), shape=(64, 96))
    assert (state.labels[rr, cc] == 0).all()
    editor.key_down("l")
    loop = [(5, 20), (30, 20), (30, 40), (5, 40)]
    editor.mouse_down(*loop[0])
    for point in loop[1:]:
        editor.mouse_move(*point)
    editor.mouse_up(5, 40)
    rr, cc = polygon(np.array([20, 20, 40, 40, 40]), np.array([5, 30, 30, 5, 5]), shape=(64, 96))
    assert (state.labels[rr, cc] == 0).all()              # a freehand lasso fills its inside
    editor.key_down("f")
    flat = np.zeros((32, 32, 3), np.uint8)
    flat[:, 16:] = 200
    fill_state = ItemState(flat, np.zeros((32, 32), np.int32), ["a"])
    fill_state.add_item("b")
    MaskEditor(fill_state).state.flood_fill(20, 5, tolerance=5)
    assert np.array_equal(fill_state.labels == 1, flat[..., 0] == 200)


def test_move_tool_records_a_pending_move_and_previews_the_refill(state):
    editor = MaskEditor(state)
    editor.tool.value = "move"
    editor.mouse_down(10, 5)                     # grabs "top"
    editor.mouse_up(14, 12)
    assert state.selected == 2 and state.moves[2] == M.ItemMove(dx=4, dy=7)
    editor.scale.value = 0.5
    assert state.moves[2].scale == 0.5
    labels, active = state.preview_moves()
    expected, expected_active = M.move_items(state.labels, {2: M.ItemMove(4, 7, 0.5)})
    assert np.array_equal(labels, expected) and np.array_equal(active, expected_active)
    picture = editor.render_array()
    assert picture.shape == (64, 96, 3)
    state.undo(); state.undo()
    assert state.moves == {}


def test_palette_and_editor_stay_in_sync(state):
    editor, palette = MaskEditor(state), ItemPalette(state)
    palette.rows.children[1].children[1].click()                  # swatch of item 1
    assert state.selected == 1 and "right" in editor.status.value
    palette.rows.children[1].children[2].value = "bag"            # rename
    palette.rows.children[1].children[3].value = "a photo of *"
    assert state.names[1] == "bag" and state.templates[1] == "a photo of *"
    palette._checks[0].value = palette._checks[2].value = True
    palette.merge_button.click()
    assert state.num_items == 2 and len(palette.rows.children) == 2
    assert (state.labels[:16, :48] == 0).all()
    state.selected = 1
    palette.delete_button.click()
    assert state.num_items == 1 and (state.labels == 0).all()
    palette.delete_button.click()
    assert "only item" in palette.message.value
    state.undo()
    assert state.num_items == 2 and len(palette.rows.children) == 2
    palette.add_button.click()
    assert state.selected == 2 and palette.rows.children[2].children[2].value == "item2"
    with pytest.raises(M.PartitionError, match="no pixels"):
        state.check()


def test_items_editor_saves_into_the_session_and_refuses_empty_items(tmp_path):
    s = Session.create(tmp_path / "s", data.coffee(), resolution=64, multiple=8)
    ui = ItemsEditor(s)
    ui.state.add_item("cup")
    before = (tmp_path / "s" / "session.json").read_bytes()
    assert not ui.save() and "no pixels" in ui.message.value
    assert (tmp_path / "s" / "session.json").read_bytes() == before
    ui.editor.size.value = 5
    ui.editor.mouse_down(20, 20); ui.editor.mouse_up(20, 20)
    assert ui.save()
    again = Session.open(tmp_path / "s")
    assert [i.label for i in again.images[0].items] == ["image", "cup"]
    assert np.array_equal(again.images[0].labels, ui.state.labels)
    ui.state.reset()
    assert np.array_equal(ui.state.labels, again.images[0].labels)


def test_sam_prompts_grow_the_selected_item(state):
    from dedit_nb.segment.sam import SamPrompter, build_sam
    torch.manual_seed(0)
    prompter = SamPrompter(build_sam("tiny"), state.image)
    editor = MaskEditor(state, prompter=prompter)
    state.selected = 0
    editor.tool.value = "sam"
    expected = prompter.predict(points=[(70, 40)], point_labels=[1])
    before = state.labels.copy()
    editor.mouse_down(70, 40); editor.mouse_up(70, 40)
    assert np.array_equal(state.labels, np.where(expected, 0, before))
    editor.sam_mode.value = "box"
    box_mask = prompter.predict(box=(5, 5, 30, 20))
    editor.mouse_down(5, 5); editor.mouse_up(30, 20)
    assert (state.labels[box_mask] == 0).all()


def test_gallery_before_after_and_saving(tmp_path):
    from dedit_nb.edits import EditResult
    s = Session.create(tmp_path / "s", data.coffee(), resolution=64, multiple=8)
    original = s.images[0].working
    after = 255 - original
    regions = M.edit_regions(np.eye(*original.shape[:2], dtype=bool), 1)
    result = EditResult("text", [after], original, s.images[0].labels, regions, {"kind": "text", "params": {}})
    mix = before_after(original, after, 0.25)
    col = round(0.25 * original.shape[1])
    assert np.array_equal(mix[:, :col], original[:, :col]) and np.array_equal(mix[:, col + 1:], after[:, col + 1:])
    gallery = ResultGallery(s)
    card = gallery.add(result)
    card.selected.value = True
    saved = gallery.save_selected()
    assert len(saved) == 1 and (saved[0] / "manifest.json").exists() and (saved[0] / "image_0.png").exists()
    assert Session.open(tmp_path / "s").history[-1]["kind"] == "saved-result"


def test_edit_panel_generates_into_the_gallery(tmp_path, tiny_model_dirs):
    from dedit_nb import FinetuneConfig, finetune, load_model
    from widgets import EditPanel
    model = load_model(str(tiny_model_dirs["sd"]))
    s = Session.create(tmp_path / "s", data.coffee(), resolution=32, multiple=8)
    labels = np.zeros(s.images[0].labels.shape, np.int32)
    labels[:, 16:] = 1
    s.set_items(0, labels, ["left", "right"])
    finetune(model, s, FinetuneConfig(num_tokens=1, stage1_steps=1, stage2_steps=1), progress=False)
    panel = EditPanel(model, s)
    panel.steps.value, panel.edge.value = 5, 1
    panel.kind.value, panel.item.value, panel.prompt.value = "text", 1, "a red bag"
    result = panel.run()
    assert result.kind == "text" and len(panel.gallery.cards) == 1
    assert result.manifest["prompts"]["right"] == "a red bag"
    panel.kind.value = "move"
    assert panel.run() is None and len(panel.gallery.cards) == 1          # no move dragged yet: refused
    panel.canvas.mouse_down(24, 10)
    panel.canvas.mouse_up(20, 12)
    moved = panel.run()
    assert moved.kind == "move" and np.array_equal(moved.labels == 1, M.transform_mask(labels == 1, -4, 2))
    assert len(panel.gallery.cards) == 2
    panel.kind.value, panel.source.value, panel.prompt.value = "image", (0, 0), ""
    transplanted = panel.run()
    assert transplanted.kind == "image" and transplanted.manifest["params"]["source_item"] == "left"
    assert transplanted.manifest["prompts"]["right"] == s.images[0].items[0].prompt()
    assert len(panel.gallery.cards) == 3
