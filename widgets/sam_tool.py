"""The mask editor's SAM prompts: a dragged box, or clicks that build one mask together.

The editor is the one owner of the click history: it holds the clicks of the mask being built
(:class:`dedit_nb.segment.sam.SamClicks`, with the logits of their mask) and passes them to the prompter,
which keeps nothing between calls and refines the mask from those logits. Escape or another selected item
starts a new mask.
"""
from __future__ import annotations

from dedit_nb.segment.sam import SamClicks


class SamTool:
    """The SAM prompts of :class:`widgets.mask_editor.MaskEditor` (which builds ``prompter``, ``sam_mode`` and
    ``state``, and sets ``sam_clicks = SamClicks()``)."""

    def _sam_event(self, start, end) -> int:
        if self.prompter is None:
            raise ValueError("no SAM model: pass prompter=SamPrompter(...) to use SAM prompts")
        if self.sam_mode.value == "box":
            x0, y0 = start
            x1, y1 = end
            return self.state.assign(self.prompter.predict(box=(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))))
        mask, clicks = self.prompter.add_click(self.sam_clicks, end, positive=self.sam_mode.value == "positive")
        changed = self.state.assign(mask)
        self.sam_clicks = clicks            # a click whose mask the items refused does not join the mask's clicks
        return changed

    def forget_sam_clicks(self) -> None:
        """The next click starts a new mask."""
        self.sam_clicks = SamClicks()
