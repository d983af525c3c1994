"""Widgets driven through their public methods and simulated canvas events; masks checked exactly."""
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from skimage import data

from dedit_nb import masks as M
from dedit_nb.images import resize_rgb
from dedit_nb.session import Session
from widgets import ItemPalette, ItemsEditor, ItemState, MaskEditor, ResultGallery, disk_stroke
from widgets.gallery import CARD_WIDTH, ResultCard, before_after


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
    palette.rows.children[1].children[3].value = "bag"            # rename
    palette.rows.children[1].children[4].value = "a photo of *"
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
    assert state.selected == 2 and palette.rows.children[2].children[3].value == "item2"
    with pytest.raises(M.PartitionError, match="no pixels"):
        state.check()


def test_items_editor_saves_into_the_session_and_refuses_empty_items(tmp_path):
    s = Session.create(tmp_path / "s", data.coffee(), resolution=64, multiple=8)
    ui = ItemsEditor(s)
    ui.state.add_item("cup")
    before = (tmp_path / "s" / "session.json").read_bytes()
    assert not ui.save() and "no pixels" in ui.message.value
    assert (tmp_path / "s" / "session.json").read_bytes() == before
    ui.mask_editor.size.value = 5
    ui.mask_editor.mouse_down(20, 20); ui.mask_editor.mouse_up(20, 20)
    assert ui.save()
    again = Session.open(tmp_path / "s")
    assert [i.name for i in again.images[0].items] == ["image", "cup"]
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


def test_the_editor_owns_the_sam_clicks_and_passes_them_to_the_prompter(state):
    from dedit_nb.segment.sam import SamPrompter, build_sam
    torch.manual_seed(0)
    prompter = SamPrompter(build_sam("tiny"), state.image)
    calls, predict = [], prompter.predictor.predict
    prompter.predictor.predict = lambda **kwargs: calls.append(kwargs) or predict(**kwargs)
    editor = MaskEditor(state, prompter=prompter)
    state.selected = 0
    editor.tool.value = "sam"
    editor.mouse_down(70, 40); editor.mouse_up(70, 40)
    first = editor.sam_clicks
    assert first.points == ((70.0, 40.0),) and first.labels == (1,) and calls[-1]["mask_input"] is None
    editor.sam_mode.value = "negative"
    editor.apply_coordinates("10,10")                                          # typed clicks refine it too
    assert editor.sam_clicks.labels == (1, 0) and np.array_equal(calls[-1]["mask_input"], first.logits)
    assert calls[-1]["point_coords"].tolist() == [[70, 40], [10, 10]]
    editor.key_down("Escape")                                                  # a new mask
    editor.mouse_down(20, 30); editor.mouse_up(20, 30)
    assert calls[-1]["mask_input"] is None and editor.sam_clicks.points == ((20.0, 30.0),)
    state.selected = 1                                                         # another item: a new mask
    assert editor.sam_clicks.points == ()
    editor.sam_mode.value = "box"
    editor.mouse_down(5, 5); editor.mouse_up(30, 20)
    assert calls[-1]["mask_input"] is None and editor.sam_clicks.points == ()


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


def test_gallery_card_shows_the_chosen_images_quality_escaped():
    from dedit_nb.edits import EditResult
    from dedit_nb.quality import quality_record
    original = data.coffee()[:40, :48].copy()
    active = np.zeros(original.shape[:2], bool)
    active[10:20, 10:30] = True
    regions = M.edit_regions(active, 2)
    kept, leaked = original.copy(), original.copy()
    kept[active] = 0
    leaked[~active] = 255 - leaked[~active]
    records = [quality_record(original, img, regions) for img in (kept, leaked)]
    records[1]["weight_scores"] = {"<b onmouseover=x>": 1.5}
    card = ResultCard(EditResult("text", [kept, leaked], original, np.zeros(active.shape, int), regions,
                                 {"kind": "text", "params": {}, "quality": records}))
    assert card.quality in card.children
    assert "<td style='padding:0 4px'>0</td>" in card.quality.value and "∞" in card.quality.value
    card.choice.value = 1
    changed = records[1]["preserved_pixels_changed"]
    assert changed > 0 and f"<td style='padding:0 4px'>{changed}</td>" in card.quality.value
    assert "&lt;b onmouseover=x&gt;" in card.quality.value and "<b onmouseover" not in card.quality.value
    no_record = ResultCard(EditResult("text", [kept], original, np.zeros(active.shape, int), regions, {}))
    assert no_record.quality.value == ""


def finetuned_halves(tmp_path, model_dir, names):
    """A session of the coffee photo split into a left and a right item, finetuned for one step a stage."""
    from dedit_nb import FinetuneConfig, finetune, load_model
    model = load_model(str(model_dir))
    s = Session.create(tmp_path / "s", data.coffee(), resolution=32, multiple=8)
    labels = np.zeros(s.images[0].labels.shape, np.int32)
    labels[:, 16:] = 1
    s.set_items(0, labels, names)
    finetune(model, s, FinetuneConfig(num_tokens=1, stage1_steps=1, stage2_steps=1), progress=False)
    return model, s, labels


def test_edit_panel_generates_into_the_gallery(tmp_path, tiny_model_dirs):
    from widgets import EditPanel
    model, s, labels = finetuned_halves(tmp_path, tiny_model_dirs["sd"], ["left", "right"])
    panel = EditPanel(model, s)
    panel.steps.value, panel.edge.value = 5, 1
    panel.kind.value, panel.item.value, panel.prompt.value = "text", 1, "a red bag"
    live = []     # (progress, preview picture) as the sampler's step hook shows them while the edit runs
    panel.preview.observe(lambda ch: live.append((panel.progress.value, ch["new"])), "value")
    result = panel.run()
    assert result.kind == "text" and len(panel.gallery.cards) == 1
    assert [p for p, _ in live] == [1, 2, 3, 4, 5]                          # every step, in order
    from PIL import Image
    import io
    last = np.asarray(Image.open(io.BytesIO(live[-1][1])).convert("RGB"))
    assert panel.preview_width // 2 < last.shape[1] <= panel.preview_width    # enlarged to the preview's width
    assert len({png for _, png in live}) > 1                                # the estimate changes as it samples
    assert panel.preview.layout.display == "none"                           # hidden again when done
    assert result.manifest["prompts"]["right"] == "a red bag"
    panel.kind.value = "move"
    assert panel.run() is None and len(panel.gallery.cards) == 1          # no move dragged yet: refused
    panel.canvas.mouse_down(24, 10)
    panel.canvas.mouse_up(20, 12)
    moved = panel.run()
    assert moved.kind == "move" and np.array_equal(moved.labels == 1, M.transform_mask(labels == 1, -4, 2))
    assert len(panel.gallery.cards) == 2
    panel.kind.value, panel.source.value = "image", (0, 0)
    transplanted = panel.run()
    assert transplanted.kind == "image" and transplanted.manifest["params"]["source_item"] == "left"
    assert transplanted.manifest["prompts"]["right"] == s.images[0].items[0].prompt()
    assert len(panel.gallery.cards) == 3
    panel.kind.value, panel.scheduler.value = "recon", "euler-ancestral"      # the sampler picked in the panel
    ancestral = panel.run()
    assert ancestral.manifest["sampling"]["scheduler"] == "euler-ancestral"
    assert transplanted.manifest["sampling"]["scheduler"] == "ddim"
    panel.scheduler.value = "ddim"
    assert not np.array_equal(panel.run().images[0], ancestral.images[0])   # same seed, another sampler


def test_edit_panel_collects_operations_and_samples_them_in_one_pass(tmp_path, tiny_model_dirs):
    """A text edit, a move dragged in the canvas and an item added from a drawn mask, listed, then one Generate:
    one composed edit; a reshape starts its canvas from the item's mask; a box by coordinates adds an item."""
    from widgets import EditPanel
    model, s, labels = finetuned_halves(tmp_path, tiny_model_dirs["sd"], ["left", "right"])
    started = EditPanel(model, s, edits=[{"kind": "remove", "item": "left"}],        # 03's edits start the list
                        sampling={"scheduler": "PNDMScheduler"})                     # any diffusers class
    assert started.sampling()["scheduler"] == "PNDMScheduler"
    assert started.operations.operations == [{"kind": "remove", "item": "left"}]
    assert started.operations.chooser.options[0][0] == "1. remove: item='left'"
    panel = EditPanel(model, s, sampling={"steps": 2, "num_images": 1, "edge_thickness": 1})
    assert panel.sampling()["steps"] == 2 and panel.sampling()["num_images"] == 1     # 03's values, not defaults
    panel.kind.value, panel.item.value, panel.prompt.value = "text", 0, "a red bag"
    panel.operations.add_button.click()
    panel.kind.value = "move"
    panel.canvas.mouse_down(24, 10)
    panel.canvas.mouse_up(20, 12)                            # item 1 dragged by (-4, 2)
    panel.operations.add_button.click()
    panel.kind.value, panel.item_name.value, panel.prompt.value = "add", "hat", "a red hat"
    assert shown_in(panel, panel.draw_canvas) and not shown_in(panel, panel.canvas)
    panel.operations.add_button.click()
    assert "paint the mask" in panel.error.value and len(panel.operations.operations) == 2   # nothing drawn yet
    panel.draw_canvas.apply_coordinates("3,3 8,3")           # a brush stroke: the new item's pixels
    drawn = panel.drawing.labels == 1
    assert drawn.any() and not drawn[20:].any()
    panel.operations.add_button.click()
    assert [op["kind"] for op in panel.operations.operations] == ["text", "move", "add"]
    assert panel.operations.operations[1] == {"kind": "move", "item": 1, "dx": -4.0, "dy": 2.0, "scale": 1.0}
    assert panel.operations.chooser.options[2][0].startswith("3. add: name='hat', prompt='a red hat', mask=")
    calls = []
    real = panel.editor_backend.run
    panel.editor_backend.run = lambda *a, **k: calls.append(a[1]) or real(*a, **k)
    result = panel.run()
    assert len(calls) == 1 and result.kind == "composed" and len(panel.gallery.cards) == 1   # one sampling pass
    assert np.array_equal(result.labels == 2, drawn)                 # the added item, drawn on top
    assert (result.labels == 1).sum() and result.manifest["prompts"]["left"] == "a red bag"
    assert np.array_equal(result.labels[~drawn] == 1, (M.transform_mask(labels == 1, -4, 2))[~drawn])
    panel.operations.remove(0)                              # drop the text edit
    assert [op["kind"] for op in panel.operations.operations] == ["move", "add"]
    panel.operations.clear()
    assert panel.operations.operations == [] and panel.operations.chooser.layout.display == "none"
    panel.kind.value, panel.item.value = "reshape", 1
    assert np.array_equal(panel.drawing.labels == 1, labels == 1)   # starts from the item's own mask
    panel.item.value = 0
    assert np.array_equal(panel.drawing.labels == 1, labels == 0)
    panel.kind.value, panel.pixel_source.value, panel.box.value = "add", "box", "2, 2, 10, 6"
    assert shown_in(panel, panel.box) and shown_in(panel, panel.canvas) and not shown_in(panel, panel.draw_canvas)
    boxed = panel.run()                                      # the list is empty: the edit the controls show
    assert boxed.kind == "add" and (boxed.labels == 2).sum() == 8 * 4 and (boxed.labels[2:6, 2:10] == 2).all()
    earlier = panel.operations
    assert len(earlier.requests) == 2 and [k for _, k in earlier.earlier.options] == [1, 0]   # newest first
    earlier.reopen(1)                                        # the boxed add, back in the list as it was sent
    assert [{k: v for k, v in op.items() if v is not None} for op in earlier.operations] == [
        {"kind": "add", "name": "hat", "prompt": "a red hat", "box": [2, 2, 10, 6]}]
    earlier.clear()
    earlier.reopen(0)                                        # the composed edit: its drawn mask was not kept
    assert earlier.operations == [] and "fingerprint" in panel.error.value
    panel.box.value = "2, 2"
    assert panel.run() is None and "two corners" in panel.error.value


def test_edit_panel_controls_and_defaults_are_the_schemas(tmp_path, tiny_model_dirs):
    from dedit_nb.parameters import OPERATIONS, SAMPLING
    from widgets import EditPanel
    model, s, _ = finetuned_halves(tmp_path, tiny_model_dirs["sd"], ["left", "right"])
    panel = EditPanel(model, s)
    assert list(panel.kind.options) == list(OPERATIONS)
    assert set(panel.sampling_controls) == {f.name for f in SAMPLING if f.widget != "none"}
    for name, control in panel.sampling_controls.items():
        field = SAMPLING[name]
        assert control.tooltip == field.help, name
        if field.default is not None:
            assert control.value == field.default, name       # the schema's default (no profile setting)
        if field.low is not None and hasattr(control, "min"):
            assert control.min == field.low, name
        if field.choices:
            assert list(control.options) == list(field.choices), name
    assert panel.item_name.value == OPERATIONS["add"]["name"].default
    panel.kind.value = "text"
    assert panel.prompt.tooltip == OPERATIONS["text"]["prompt"].help
    panel.kind.value = "add"
    assert panel.prompt.tooltip == OPERATIONS["add"]["prompt"].help


# --- the view, keys, status -------------------------------------------------------------------------------

def test_view_is_nearest_neighbour_and_zoom_keeps_the_point_under_the_pointer():
    img = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3) * 5
    st = ItemState(img, np.zeros((4, 4), np.int32), ["all"])
    editor = MaskEditor(st, display_width=64)
    editor.overlay_mode.value = "solid"
    view = editor.view_array()
    expected = np.repeat(np.repeat(editor.render_array(), 16, 0), 16, 1)     # 16x16 blocks, no blending
    assert np.array_equal(view, expected)
    import io
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(editor.frame.value))), view)   # sent losslessly
    before = editor.to_image(40, 24)
    editor.zoom_by(2.0, about=(40, 24))
    assert editor.zoom == 2 and np.allclose(editor.to_image(40, 24), before)
    assert np.allclose(editor.to_image(*editor.to_canvas(1.25, 3.5)), (1.25, 3.5))
    editor.pan_by(1000, 1000)                                                # clamped inside the image
    assert editor.origin == (2.0, 2.0) and np.allclose(editor.to_image(64, 64), (4, 4))
    editor.handle_event({"type": "keydown", "key": "0"})
    assert editor.zoom == 1 and editor.origin == (0.0, 0.0)
    editor.handle_event({"type": "wheel", "deltaY": -100, "relativeX": 0, "relativeY": 0})
    assert editor.zoom == 1.25 and editor.origin == (0.0, 0.0)


def test_space_drag_pans_without_painting(state):
    editor = MaskEditor(state, display_width=192)
    editor.zoom_by(4.0, about=(0, 0))
    before = state.labels.copy()
    editor.handle_event({"type": "keydown", "key": " "})
    assert "grab" in editor.cursor_style.value
    editor._canvas_down(100, 100); editor._canvas_move(60, 80); editor._canvas_up(60, 80)
    assert editor.origin == (5.0, 2.5) and np.array_equal(state.labels, before)   # 40 and 20 screen px at 8x
    editor.handle_event({"type": "keyup", "key": " "})
    editor._canvas_down(100, 100); editor._canvas_up(100, 100)
    assert not np.array_equal(state.labels, before)                          # painting again


def test_a_click_on_a_zoomed_view_paints_the_pixel_under_it(state):
    editor = MaskEditor(state, display_width=192)                            # 2 screen px per image pixel
    editor.zoom_by(4.0, about=(0, 0))                                        # 8 screen px per image pixel
    editor.size.value = 1
    state.selected = 2
    u, v = (30 + 0.5) * 8, (40 + 0.5) * 8                                    # image pixel (40, 30)
    editor._canvas_down(u, v)
    editor._canvas_up(u, v)
    assert state.labels[40, 30] == 2 and state.labels[40, 33] != 2


def test_shortcuts_over_the_canvas_need_no_click_and_buttons_follow_the_history(state):
    editor = MaskEditor(state)
    before = state.labels.copy()
    assert editor._keys in editor.children and editor._keys.canvas_class == editor.css_class   # keys on hover
    assert editor.undo_button.disabled and editor.redo_button.disabled
    editor.handle_event({"type": "keydown", "key": "e"})
    assert editor.tool.value == "eraser" and np.array_equal(state.labels, before)  # no painting click
    assert "eraser" in editor.status.value                                  # the current tool, not the last used
    editor.handle_event({"type": "keydown", "key": "]"})
    size = editor.size.value
    assert f"{size}px" in editor.status.value and f"r='{size * editor.view_scale}'" in \
        editor.cursor_style.value.replace("%27", "'").replace("%3D", "=")     # the brush outline cursor, to size
    editor.handle_event({"type": "keydown", "key": "b"})
    editor.mouse_down(70, 40); editor.mouse_up(70, 40)
    assert not editor.undo_button.disabled and editor.redo_button.disabled
    editor.handle_event({"type": "keydown", "key": "z", "ctrlKey": True})
    assert editor.undo_button.disabled and not editor.redo_button.disabled
    assert np.array_equal(state.labels, before)


def test_status_is_current_messages_clear_and_unsaved_changes_show(tmp_path):
    s = Session.create(tmp_path / "s", data.coffee(), resolution=64, multiple=8)
    ui = ItemsEditor(s)
    assert "saved" in ui.mask_editor.status.value and "unsaved" not in ui.mask_editor.status.value
    ui.state.add_item("cup")
    assert "unsaved changes" in ui.mask_editor.status.value
    assert not ui.save() and "no pixels" in ui.message.value and "dedit-error" in ui.message.value
    ui.mask_editor.size.value = 5
    ui.mask_editor.mouse_down(20, 20); ui.mask_editor.mouse_up(20, 20)
    assert ui.message.value == ""                                          # the error answered one press
    assert ui.save() and "saved 2 items" in ui.message.value and "unsaved" not in ui.mask_editor.status.value
    ui.mask_editor.mouse_down(40, 20); ui.mask_editor.mouse_up(40, 20)
    assert ui.message.value == "" and "unsaved changes" in ui.mask_editor.status.value


def test_a_pending_move_is_refused_on_save_until_applied_or_cleared(tmp_path):
    s = Session.create(tmp_path / "s", data.coffee(), resolution=64, multiple=8)
    labels = np.zeros(s.images[0].labels.shape, np.int32)
    labels[:, 32:] = 1
    s.set_items(0, labels, ["left", "right"])
    ui = ItemsEditor(s)
    ui.state.set_move(1, dx=-4)                 # through the API: 01's editor has no move tool (issue 23.6)
    before = (tmp_path / "s" / "session.json").read_bytes()
    assert not ui.save() and "pending move" in ui.message.value and "apply moves" in ui.message.value
    assert (tmp_path / "s" / "session.json").read_bytes() == before
    expected = ui.state.preview_moves()[0].copy()
    ui.state.apply_moves()
    assert ui.state.moves == {} and np.array_equal(ui.state.labels, expected)
    assert ui.save() and np.array_equal(Session.open(tmp_path / "s").images[0].labels, expected)


def test_every_tool_has_a_path_by_typed_coordinates(state):
    editor = MaskEditor(state)
    state.selected = 2
    editor.size.value = 1
    editor.apply_coordinates("10,40 20,40")
    assert (state.labels[40, 10:21] == 2).all()
    editor.tool.value = "polygon"
    state.selected = 0
    editor.apply_coordinates("60,30 90,30 90,60")
    assert state.labels[35, 85] == 0
    editor.tool.value = "move"
    state.selected = 1
    editor.apply_coordinates("-5, 3")
    assert state.moves[1] == M.ItemMove(dx=-5, dy=3)
    editor.coords.value = "oops"
    editor.apply_coords_button.click()
    assert "x,y pairs" in editor.message.value and "dedit-error" in editor.message.value
    editor.tool.value = "fill"
    flat = ItemState(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.int32), ["a"])
    flat.add_item("b")
    fill = MaskEditor(flat)
    fill.tool.value = "fill"
    fill.apply_coordinates("3,3")
    assert (flat.labels == 1).all()


def test_palette_has_headers_tooltips_and_merge_clears_the_ticks(state):
    palette = ItemPalette(state)
    header = palette.children[0]
    assert "prompt template" in header.children[4].value and "* stands for the item" in header.children[4].value
    swatch = palette.rows.children[1].children[1]
    from dedit_nb.display import item_colour
    assert swatch.style.button_color == "rgb({},{},{})".format(*item_colour(1))   # the canvas colour, exactly
    for button in (palette.add_button, palette.merge_button, palette.split_button, palette.delete_button):
        assert button.tooltip and button.layout.width == "auto"
    palette._checks[0].value = palette._checks[2].value = True
    palette.merge_button.click()
    assert state.num_items == 2 and palette.checked() == []
    palette.split_button.click()
    assert "nothing to split" in palette.message.value
    palette.add_button.click()
    assert palette.message.value == ""


def test_editor_tools_have_tooltips_and_labels_that_fit(state):
    editor = MaskEditor(state)
    assert len(editor.tool.tooltips) == len(editor.tool.options) and all(editor.tool.tooltips)
    assert all(len(label) <= 8 for label, _ in editor.tool.options)         # 76 px buttons hold 8 characters
    for button in (editor.undo_button, editor.redo_button, editor.reset_button, editor.apply_moves_button,
                   editor.clear_moves_button, editor.zoom_in_button, editor.zoom_out_button, editor.fit_button):
        assert button.tooltip and button.layout.width == "auto"


# --- hostile labels ------------------------------------------------------------------------------------

def _html_values(widget):
    import ipywidgets as W
    out = []
    if isinstance(widget, W.HTML):
        out.append(widget.value)
    for child in getattr(widget, "children", ()):
        out += _html_values(child)
    return out


def test_labels_and_errors_reach_html_escaped(tmp_path):
    evil = "<img src=x onerror=alert(1)>"
    s = Session.create(tmp_path / "s", data.coffee(), resolution=64, multiple=8)
    labels = np.zeros(s.images[0].labels.shape, np.int32)
    labels[:, 32:] = 1
    s.set_items(0, labels, [evil, "ok"])
    ui = ItemsEditor(s)
    ui.state.add_item(evil + "2")
    ui.save()                                                                # error naming the evil item
    ui.palette.delete_button.click()
    ui.state.selected = 0
    ui.palette.split_button.click()
    values = _html_values(ui)
    assert any("&lt;img" in v for v in values)                               # the labels are shown ...
    assert not any("<img" in v for v in values)                              # ... never as markup


def test_gallery_cards_are_readable_in_a_grid(tmp_path):
    import ipywidgets as W
    from dedit_nb.edits import EditResult
    from dedit_nb.display import REGION_COLOURS
    s = Session.create(tmp_path / "s", data.coffee(), resolution=32, multiple=8)
    original = s.images[0].working
    after = 255 - original
    regions = M.edit_regions(np.eye(*original.shape[:2], dtype=bool), 1)
    params = {"item": "gold & <b>silver</b>", "item_index": 1, "prompt": "x" * 200}
    result = EditResult("text", [after], original, s.images[0].labels, regions,
                        {"kind": "text", "params": params, "sampling": {"guidance": 5.000000000000001}})
    gallery = ResultGallery(s)
    card = gallery.add(result)
    assert isinstance(gallery.box, W.GridBox) and "auto-fill" in gallery.box.layout.grid_template_columns
    title = card.title.value
    assert "{" not in title and "gold &amp; &lt;b&gt;silver" in title and "…" in title
    shown_html = "".join(_html_values(card))
    assert "5.000000000000001" not in shown_html and "&quot;guidance&quot;: 5.0" in shown_html
    from PIL import Image
    import io
    shown = np.asarray(Image.open(io.BytesIO(card.picture.value)).convert("RGB"))
    factor = shown.shape[1] // original.shape[1]
    assert factor == CARD_WIDTH // original.shape[1] > 1                      # crisp: a whole-pixel enlargement
    assert np.array_equal(shown[::factor, ::factor], after)                   # starts on the result
    legend = "".join(_html_values(card))
    for rgb in REGION_COLOURS:
        assert "rgb({},{},{})".format(*rgb) in legend


class _Tags(HTMLParser):
    """The start tags of an HTML fragment, each with its attributes (unescaped, as a browser reads them)."""

    def __init__(self, fragment: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(fragment)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_a_card_tooltip_keeps_hostile_names_and_prompts_inside_its_attribute(tmp_path):
    """The card title's tooltip carries the item name and prompt in a quoted attribute: a quote in them must
    not close it and open attributes of its own (escaped in element text only is not enough there)."""
    from dedit_nb.display import edit_summary
    from dedit_nb.edits import EditResult
    s = Session.create(tmp_path / "s", data.coffee(), resolution=32, multiple=8)
    original = s.images[0].working
    params = {"item": "cup' onmouseover='alert(1)", "prompt": 'a "bag" onclick="alert(2)" <script>',
              "source_item": "x'/><img src=x onerror=alert(3)>"}
    regions = M.edit_regions(np.eye(*original.shape[:2], dtype=bool), 1)
    card = ResultGallery(s).add(EditResult("image", [original], original, s.images[0].labels, regions,
                                           {"kind": "image", "params": params}))
    tags = _Tags(card.title.value).tags
    assert [tag for tag, _ in tags] == ["div", "b"]
    attributes = tags[0][1]
    assert set(attributes) == {"class", "title", "style"}
    assert attributes["title"] == edit_summary("image", params)
    assert "onmouseover='alert(1)" in attributes["title"] and 'onclick="alert(2)"' in attributes["title"]


def test_edit_panel_shares_the_selection_and_hides_what_does_not_apply(tmp_path, tiny_model_dirs):
    from dataclasses import asdict
    from dedit_nb.sampler import SamplingConfig
    from widgets import EditPanel
    model, s, _ = finetuned_halves(tmp_path, tiny_model_dirs["sd"], ["left", "<b>right</b>"])
    panel = EditPanel(model, s)
    profile = {k: v for k, v in asdict(SamplingConfig.for_model(model)).items() if k != "profile"}
    assert panel.sampling() == profile and panel.sampling()["steps"] == 50   # the schema's and SD 1.x profile's
    panel.strength.value = 0.1 + 0.2                                         # 0.30000000000000004
    assert panel.sampling()["strength"] == 0.3
    panel.canvas.mouse_down(24, 10); panel.canvas.mouse_up(24, 10)           # a click on item 1 in the canvas
    assert panel.item.value == 1 and panel.state.selected == 1
    panel.item.value = 0
    assert panel.state.selected == 0 and "left" in panel.canvas.status.value
    shown = lambda: {n for n, c in panel.controls.items() if c.layout.display != "none"}  # noqa: E731
    panel.kind.value = "text"
    assert shown() == {"item", "prompt"}
    assert panel.canvas.rows["move"].layout.display == "none"               # no item scale for a text edit
    panel.kind.value = "move"
    assert shown() == {"moves"} and panel.canvas.rows["move"].layout.display is None
    panel.kind.value = "image"
    assert shown() == {"item", "source", "template"}
    panel.kind.value = "add"
    assert shown() == {"name", "prompt", "pixels"}
    panel.kind.value = "reshape"
    assert shown() == {"item", "pixels"}
    panel.kind.value = "recon"
    assert shown() == set()
    seen = []
    real = panel.editor_backend.run
    panel.editor_backend.run = lambda *a, **k: (seen.append(panel.generate.disabled), real(*a, **k))[1]
    panel.steps.value = 2
    assert panel.run() is not None and seen == [True] and not panel.generate.disabled   # disabled while running
    panel.kind.value, panel.prompt.value = "text", ""
    assert panel.run() is None and not panel.generate.disabled
    assert "dedit-error" in panel.error.value and "needs prompt" in panel.error.value     # the schema's word


# --- limits of the editor and the API (issue 14.7) ------------------------------------------------------

def test_merge_with_a_repeated_item_keeps_every_label_named(state):
    state.merge([0, 0, 1])
    assert state.num_items == 2 and state.names == ["left", "top"]
    assert_partition(state)


def test_repeated_drags_stop_at_the_image_and_render_never_raises(state):
    editor = MaskEditor(state)
    editor.tool.value = "move"
    x, y = 10, 5                                                            # "top", drawn where it is shown
    for _ in range(6):
        editor.mouse_down(x, y)
        editor.mouse_up(x, y + 20)
        y += 20
    assert state.moves[2].dy <= 63 and editor.render_array().shape == (64, 96, 3)
    assert "off the image" in editor.message.value
    labels, _ = state.preview_moves()
    assert (labels == 2).any()


def test_item_scale_on_a_new_empty_item_says_why(state):
    editor = MaskEditor(state)
    state.add_item("new")
    editor.scale.value = 1.5                                                # no exception
    assert "no pixels to move" in editor.message.value and editor.scale.value == 1.0 and state.moves == {}


def test_a_stroke_far_off_the_canvas_is_clipped_not_rasterised():
    far = 1e15
    stroke = disk_stroke((20, 30), [(-far, 5.5), (far, 5.5)], 2)           # would need 2e15 points unclipped
    assert np.array_equal(np.nonzero(stroke.any(axis=1))[0], np.arange(3, 8))
    assert stroke[3:8].all() and not stroke[:3].any() and not stroke[8:].any()
    diagonal = disk_stroke((20, 30), [(-far, -far), (far, far)], 1.5)
    yy, xx = np.mgrid[0:20, 0:30]
    distance = np.abs(xx - yy) / np.sqrt(2)                                 # to the line y = x
    assert (diagonal[distance <= 1.0]).all() and not diagonal[distance > 2.3].any()
    assert np.array_equal(disk_stroke((20, 30), [(3, 4)], 0), np.pad([[True]], ((4, 15), (3, 26))))
    with pytest.raises(ValueError, match="finite"):
        disk_stroke((20, 30), [(0, 0), (np.inf, 1)], 2)


def test_huge_and_empty_label_maps_fail_clearly(tmp_path):
    s = Session.create(tmp_path / "s", data.coffee(), resolution=32, multiple=8)
    labels = np.zeros(s.images[0].labels.shape, np.int64)
    labels[0, 0] = 2 ** 40
    with pytest.raises(M.PartitionError, match="label values go up to 1099511627776"):
        s.set_items(0, labels)
    with pytest.raises(M.PartitionError, match="at least one pixel"):
        M.check_labels(np.zeros((0, 0), np.int32), 1)
    with pytest.raises(M.PartitionError, match="at least one pixel"):
        ItemState(np.zeros((0, 0, 3), np.uint8), np.zeros((0, 0), np.int32), ["a"])
    with pytest.raises(M.PartitionError, match="outside 0..1"):
        ItemState(data.coffee()[:4, :4], np.full((4, 4), 2 ** 40), ["a", "b"])


# --- a state machine over the editor ---------------------------------------------------------------------

from hypothesis import settings, strategies as st_  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule  # noqa: E402

coord = st_.one_of(st_.floats(-3, 15), st_.floats(-1e12, 1e12))


class EditorMachine(RuleBasedStateMachine):
    """Random sequences of editor actions, far-off coordinates included; the items stay a valid partition,
    every list stays one entry per item, and the canvas always renders."""

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)
        labels = np.zeros((10, 12), np.int32)
        labels[:, 6:] = 1
        self.state = ItemState(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8), labels, ["a", "b"])
        self.mask_editor = MaskEditor(self.state, display_width=48)

    @rule(tool=st_.sampled_from(["brush", "eraser", "lasso"]), size=st_.integers(1, 4),
          points=st_.lists(st_.tuples(coord, coord), min_size=1, max_size=4))
    def stroke(self, tool, points, size):
        self.mask_editor.tool.value, self.mask_editor.size.value = tool, size
        self.mask_editor.mouse_down(*points[0])
        for p in points[1:-1]:
            self.mask_editor.mouse_move(*p)
        self.mask_editor.mouse_up(*points[-1])

    @rule(start=st_.tuples(coord, coord), end=st_.tuples(coord, coord))
    def drag(self, start, end):
        self.mask_editor.tool.value = "move"
        self.mask_editor.mouse_down(*start)
        self.mask_editor.mouse_up(*end)

    @rule(scale=st_.floats(0.2, 3.0))
    def scale(self, scale):
        self.mask_editor.scale.value = scale

    @rule()
    def add(self):
        self.state.add_item()

    @rule(items=st_.lists(st_.integers(0, 2), min_size=2, max_size=4))
    def merge(self, items):
        try:
            self.state.merge(items)
        except ValueError:
            pass

    @rule(item=st_.integers(0, 5), action=st_.sampled_from(["delete", "split", "select"]))
    def item_action(self, item, action):
        try:
            if action == "delete":
                self.state.delete(item)
            elif action == "split":
                self.state.split(item)
            else:
                self.state.selected = item
        except (ValueError, Exception) as exc:  # noqa: BLE001 - refusals must be clear errors
            assert isinstance(exc, ValueError) or "no item" in str(exc)

    @rule(action=st_.sampled_from(["undo", "redo", "apply", "clear", "zoom", "fit"]))
    def history(self, action):
        {"undo": self.state.undo, "redo": self.state.redo, "apply": self.state.apply_moves,
         "clear": self.state.clear_moves, "zoom": lambda: self.mask_editor.zoom_by(2.0, (7, 30)),
         "fit": lambda: self.mask_editor.set_view(1.0, (0, 0))}[action]()

    @invariant()
    def consistent(self):
        s = self.state
        assert s.labels.shape == (10, 12) and s.labels.min() >= 0 and s.labels.max() < s.num_items
        assert len(s.names) == len(s.templates) == len(s.visible) == s.num_items
        assert 0 <= s.selected < s.num_items and all(0 <= k < s.num_items for k in s.moves)
        assert self.mask_editor.view_array().shape == (self.mask_editor.view_height, 48, 3)


TestEditorMachine = EditorMachine.TestCase
TestEditorMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)


def test_the_palette_shows_each_item_as_it_looks_in_the_photo_beside_its_name():
    """Segmented items are named by their colour in the photo ("red, middle left"); the swatch shows the canvas
    colour, so each row also shows the item's photo pixels, and those read as the colour the name says."""
    import io

    from PIL import Image

    from dedit_nb.offline.scenes import SceneObject, render
    from dedit_nb.segment.offline import colour_name, segment_offline
    scene = render("white", [SceneObject("red", "circle", 20, 22, 10), SceneObject("blue", "square", 46, 40, 9)], 64)
    part = segment_offline(scene.image, num_items=3)
    state = ItemState(scene.image, part.labels, part.item_names)
    palette = ItemPalette(state)
    assert "photo" in palette.children[0].children[2].value

    def thumbnail(k):
        return np.asarray(Image.open(io.BytesIO(palette.rows.children[k].children[2].value)).convert("RGB"))

    assert sorted(name.split(",")[0] for name in state.names) == ["blue", "red", "white"]
    for k, name in enumerate(state.names):
        assert max(thumbnail(k).shape[:2]) == 28
        assert colour_name(np.median(thumbnail(k).reshape(-1, 3), 0)) == name.split(",")[0]
    red = int(state.labels[22, 20])
    before = thumbnail(red)
    state.selected = red
    editor = MaskEditor(state)
    editor.tool.value = "fill"
    editor.apply_coordinates("46,40")            # the blue square joins the red item
    assert thumbnail(red).shape != before.shape or not np.array_equal(thumbnail(red), before)


# --- round 3 in the browser (issue 23) and widget faults (issue 27.5) ----------------------------------------

def shown_in(root, widget) -> bool:
    """True when ``widget`` is inside ``root`` and neither it nor any box around it is hidden."""
    if root is widget:
        return root.layout.display != "none"
    if getattr(root.layout, "display", None) == "none":
        return False
    return any(shown_in(child, widget) for child in getattr(root, "children", ()))


def test_hiding_one_canvas_button_hides_no_other(state):
    editor = MaskEditor(state, tools=("move",))
    editor.apply_moves_button.layout.display = "none"                      # what 03's panel does
    for control in (editor.undo_button, editor.redo_button, editor.reset_button, editor.clear_moves_button,
                    editor.zoom_in_button, editor.zoom_out_button, editor.fit_button, editor.coords,
                    editor.apply_coords_button):
        assert shown_in(editor, control)


def test_enter_in_the_coordinates_box_applies_it_with_the_typed_text(state):
    editor = MaskEditor(state)
    editor.tool.value = "move"
    state.selected = 1
    editor._keys._handle_custom_msg({"type": "submit", "value": "-5, 3"}, [])   # as the page sends it
    assert state.moves[1] == M.ItemMove(dx=-5, dy=3) and editor.coords.value == "-5, 3"
    editor._key_event({"type": "submit", "value": "oops"})
    assert "x,y pairs" in editor.message.value
    editor._key_event({"type": "keydown", "key": "e"})                      # a key over the canvas
    assert editor.tool.value == "eraser"


def test_the_segmentation_editor_has_no_move_tool(tmp_path):
    s = Session.create(tmp_path / "s", data.coffee(), resolution=64, multiple=8)
    ui = ItemsEditor(s)
    assert "move" not in [v for _, v in ui.mask_editor.tool.options]
    ui.mask_editor.handle_event({"type": "keydown", "key": "m"})
    assert ui.mask_editor.tool.value == "brush"


def test_random_pointer_and_key_events_never_raise(state):
    """2,000 handler calls in random order (tool keys mid-drag included), as a page can send them."""
    editor = MaskEditor(state, display_width=96)
    rng = np.random.default_rng(1)
    keys = list("befplms[]+-0") + ["Enter", "Escape", " ", "ArrowLeft", "z"]
    for _ in range(2000):
        u, v = rng.uniform(-20, 120, 2)
        kind = rng.integers(0, 6)
        if kind == 0:
            editor._canvas_down(u, v)
        elif kind == 1:
            editor._canvas_move(u, v)
        elif kind == 2:
            editor._canvas_up(u, v)
        elif kind == 3:
            editor.handle_event({"type": "keydown", "key": str(rng.choice(keys)), "ctrlKey": bool(rng.random() < .2)})
        elif kind == 4:
            editor.handle_event({"type": "keyup", "key": " "})
        else:
            editor.handle_event({"type": "wheel", "deltaY": float(rng.choice([-1, 1])), "relativeX": u,
                                 "relativeY": v, "boundingRectWidth": 48})
        assert_partition(state)


def test_a_tool_key_mid_drag_ends_the_drag(state):
    editor = MaskEditor(state)
    editor.tool.value = "move"
    editor.mouse_down(10, 5)
    editor.handle_event({"type": "keydown", "key": "e"})
    editor.mouse_move(20, 5)
    editor.mouse_up(20, 5)                                                  # an IndexError before
    assert editor.tool.value == "eraser" and state.moves == {}


def test_two_editors_on_one_session_never_overwrite_each_other_silently(tmp_path):
    s = Session.create(tmp_path / "s", data.coffee(), resolution=64, multiple=8)
    first, second = ItemsEditor(s), ItemsEditor(s)
    first.state.add_item("cup")
    first.mask_editor.size.value = 5
    first.mask_editor.mouse_down(20, 20); first.mask_editor.mouse_up(20, 20)
    assert first.save()
    assert "changed since this editor loaded" in second.mask_editor.status.value     # not "saved" any more
    second.state.add_item("bag")
    second.mask_editor.mouse_down(40, 20); second.mask_editor.mouse_up(40, 20)
    on_disk = (tmp_path / "s" / "session.json").read_bytes()
    assert not second.save()
    assert "reload" in second.message.value and "save over" in second.message.value
    assert (tmp_path / "s" / "session.json").read_bytes() == on_disk             # the first save stands
    assert second.reload_button.layout.display != "none"
    assert second.reload()
    assert second.state.names == ["image", "cup"] and np.array_equal(second.state.labels, first.state.labels)
    assert "changed since" not in second.mask_editor.status.value and second.reload_button.layout.display == "none"
    second.state.undo()                                                      # the work from before the reload
    assert second.state.names == ["image", "bag"]
    assert second.save(replace_newer=True)                                   # "save over", knowingly
    assert [i.name for i in Session.open(tmp_path / "s").images[0].items] == ["image", "bag"]
    assert "changed since" in first.mask_editor.status.value


@pytest.mark.parametrize("fault", [OSError(30, "Read-only file system"), "deleted"])
def test_saves_into_a_gone_or_read_only_session_say_so(tmp_path, fault):
    import shutil
    from dedit_nb.edits import EditResult
    from dedit_nb.session import SessionError
    s = Session.create(tmp_path / "s", data.coffee(), resolution=32, multiple=8)
    ui = ItemsEditor(s)
    ui.mask_editor.mouse_down(5, 5); ui.mask_editor.mouse_up(5, 5)
    ui.state.add_item("x")
    ui.mask_editor.mouse_down(5, 5); ui.mask_editor.mouse_up(5, 5)
    original = s.images[0].working
    result = EditResult("text", [original], original, s.images[0].labels,
                        M.edit_regions(np.eye(*original.shape[:2], dtype=bool), 1), {"kind": "text", "params": {}})
    gallery = ResultGallery(s)
    gallery.add(result).selected.value = True
    if fault == "deleted":
        shutil.rmtree(tmp_path / "s")
        s.save = lambda: (_ for _ in ()).throw(SessionError(f"{tmp_path / 's'} was deleted"))  # session.py's answer
    else:
        s.save = lambda: (_ for _ in ()).throw(fault)
        result.save = lambda folder: (_ for _ in ()).throw(fault)
    assert not ui.save() and "dedit-error" in ui.message.value and "not saved" in ui.message.value
    assert gallery.save_selected() == []                                     # no exception out of the button
    assert "dedit-error" in gallery.message.value
    assert ("no longer holds a session" if fault == "deleted" else "Read-only") in gallery.message.value
    assert fault != "deleted" or not (tmp_path / "s").exists()               # nothing recreated


def test_panel_state_follows_the_edit(tmp_path, tiny_model_dirs):
    """03's panel: it starts from the parameters, hides what an edit does not use, keeps every canvas control
    of a move, clears its error on any change, shows pending moves only for a move, has no saved marker,
    and a double-click runs one edit."""
    from widgets import EditPanel
    model, s, _ = finetuned_halves(tmp_path, tiny_model_dirs["sd"], ["left", "right"])
    panel = EditPanel(model, s, edit="text", item="right", prompt="a red bag")
    assert panel.item.value == 1 and panel.state.selected == 1 and panel.prompt.value == "a red bag"
    assert "saved" not in panel.canvas.status.value                          # nothing to save in 03
    panel.kind.value = "move"
    for control in (panel.canvas.undo_button, panel.canvas.clear_moves_button, panel.canvas.coords,
                    panel.canvas.apply_coords_button, panel.canvas.scale):
        assert shown_in(panel, control)
    assert not shown_in(panel, panel.canvas.apply_moves_button)
    panel.canvas.apply_coordinates("-4, 2")
    assert "pending moves" in panel.canvas.status.value
    moved = panel.canvas.render_array()
    panel.kind.value = "text"
    assert "pending moves" not in panel.canvas.status.value
    assert not np.array_equal(panel.canvas.render_array(), moved)           # the preview is off for a text edit
    panel.kind.value = "recon"
    assert not shown_in(panel, panel.strength) and not shown_in(panel, panel.edge)
    panel.kind.value = "text"
    assert shown_in(panel, panel.strength) and shown_in(panel, panel.edge)
    panel.prompt.value = ""
    panel.generate.click()
    assert "needs prompt" in panel.error.value
    panel.seed.value = 3
    assert panel.error.value == ""                                           # any change clears the error
    import time
    from widgets.edit_panel import QUEUED_CLICK_S
    time.sleep(QUEUED_CLICK_S)                                               # a later click, not a queued one
    runs = []
    real = panel.run
    panel.run = lambda: runs.append(1) or real()
    panel.prompt.value, panel.steps.value = "a red bag", 2
    panel.generate.click(); panel.generate.click()                           # the second click was queued
    assert len(runs) == 1 and len(panel.gallery.cards) == 1
    assert panel.gallery.cards[0].split.description.startswith("after")      # value 0 shows the result


def test_item_scale_follows_the_moves_and_polygons_draw_thin(state):
    editor = MaskEditor(state)
    editor.tool.value = "move"
    state.selected = 2
    editor.scale.value = 0.5
    state.apply_moves()
    assert editor.scale.value == 1.0 and state.moves == {}                  # nothing pending: back to 1
    editor.tool.value = "brush"
    editor.size.value = 20
    editor.mouse_down(10, 40); editor.mouse_move(30, 40); editor.mouse_up(30, 40)
    editor.tool.value = "polygon"
    editor.mouse_down(60, 30); editor.mouse_down(70, 30)
    assert editor.canvas.line_width == 1


def test_a_brush_too_large_for_a_cursor_is_outlined_in_the_canvas(state):
    from widgets.mask_editor import MAX_CURSOR
    editor = MaskEditor(state, display_width=384)                            # 4 screen px per image pixel
    drawn = []
    editor.canvas.stroke_circle = lambda u, v, r: drawn.append((u, v, r))
    editor.size.value = 10                                                  # 80 px across: a cursor image
    editor._canvas_move(50, 60)
    assert "data:image/svg+xml" in editor.cursor_style.value and drawn == []
    editor.size.value = 20                                                  # 160 px: too large for a cursor
    assert "data:image/svg+xml" not in editor.cursor_style.value and 2 * 20 * 4 > MAX_CURSOR
    editor._canvas_move(50, 60)
    assert drawn == [(50, 60, 80)]                                         # the outline, at the brush's size


def test_an_editor_on_another_session_object_of_the_folder_is_refused_too(tmp_path):
    """As between a notebook editor and another kernel or a batch: the session's own change check refuses."""
    Session.create(tmp_path / "s", data.coffee(), resolution=64, multiple=8)
    first, second = ItemsEditor(Session.open(tmp_path / "s")), ItemsEditor(Session.open(tmp_path / "s"))
    first.state.add_item("cup")
    first.mask_editor.mouse_down(20, 20); first.mask_editor.mouse_up(20, 20)
    assert first.save() and "changed since" in second.mask_editor.status.value
    second.state.rename(0, "whole")
    on_disk = (tmp_path / "s" / "session.json").read_bytes()
    assert not second.save() and "changed by another process" in second.message.value
    assert (tmp_path / "s" / "session.json").read_bytes() == on_disk
    assert second.reload() and second.state.names == ["image", "cup"]      # from the folder, not its old object
    second.state.rename(0, "whole")
    assert second.save() and [i.name for i in Session.open(tmp_path / "s").images[0].items] == ["whole", "cup"]
